"""The probe's L-BFGS: its direction is Nocedal and Wright's two-loop recursion on the pairs corrected for a
change of the L2 weight (those that lose their curvature dropped), it solves a known quadratic, stops after
``SMALL_STEPS`` small steps in a row, and walks a ridge path from secant extrapolations."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from bobench.protocols.lbfgs import LBFGS, SMALL_STEPS


def two_loop(S: list[torch.Tensor], Y: list[torch.Tensor], g: torch.Tensor) -> torch.Tensor:
    """Nocedal and Wright's Algorithm 7.4, H0 = (s.y / y.y) I of the newest pair: returns -H g."""
    q, alphas = g.clone(), []
    for s, y in zip(reversed(S), reversed(Y), strict=True):
        alphas.append(float(s @ q) / float(s @ y))
        q -= alphas[-1] * y
    r = q * (float(S[-1] @ Y[-1]) / float(Y[-1] @ Y[-1]))
    for s, y, a in zip(S, Y, reversed(alphas), strict=True):
        r += (a - float(y @ r) / float(s @ y)) * s
    return -r


def pairs(n: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """Curvature pairs of a random positive-definite quadratic (y = A s), so every s . y > 0."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(dim, dim, generator=g, dtype=torch.float64)
    A = M @ M.T / dim + 0.1 * torch.eye(dim, dtype=torch.float64)
    S = [torch.randn(dim, generator=g, dtype=torch.float64) for _ in range(n)]
    return A, S, [A @ s for s in S]


def quadratic(dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``A`` positive definite, ``b``, and a constant that keeps ``f = x A x / 2 - b x + c`` positive."""
    A, _, _ = pairs(1, dim, seed=seed)
    b = torch.randn(dim, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64)
    return A, b, float(b @ torch.linalg.solve(A, b)) + 1.0


def test_set_lam_corrects_the_pairs_and_drops_those_without_curvature():
    dim = 12
    gen = torch.Generator().manual_seed(1)
    S = [torch.randn(dim, generator=gen, dtype=torch.float64) for _ in range(4)]
    wmask = torch.ones(dim, dtype=torch.float64)
    wmask[-2:] = 0  # unpenalised coordinates (the bias)
    # y = c s + a little noise: after lam drops by 1, y - s_W keeps positive curvature only where c > 1
    Y = [
        c * s + 0.01 * torch.randn(dim, generator=gen, dtype=torch.float64)
        for c, s in zip((0.5, 2.0, 3.0, 0.2), S, strict=True)
    ]
    opt = LBFGS(wmask)
    opt.set_lam(1.5)
    opt.S, opt.Y = [s.clone() for s in S], [y.clone() for y in Y]
    opt.set_lam(0.5)
    want_Y = [y - 1.0 * s * wmask for s, y in zip(S, Y, strict=True)]
    assert [float(S[i] @ want_Y[i]) > 0 for i in range(4)] == [False, True, True, False]
    assert len(opt.S) == 2
    g = torch.randn(dim, generator=gen, dtype=torch.float64)
    want = two_loop([S[1], S[2]], [want_Y[1], want_Y[2]], g)
    torch.testing.assert_close(opt.direction(g), want, rtol=1e-10, atol=1e-12)
    opt.set_lam(-10.0)  # no pair keeps its curvature: back to steepest descent
    assert not opt.S and torch.equal(opt.direction(g), -g / max(float(g.abs().sum()), 1.0))


def test_minimise_solves_a_quadratic():
    A, b, _ = quadratic(40, seed=3)

    def fg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return float(0.5 * x @ A @ x - b @ x), A @ x - b

    x0 = torch.zeros(40, dtype=torch.float64)
    x, _, _, n_iter, converged = LBFGS(torch.ones(40, dtype=torch.float64)).minimise(
        fg, x0, *fg(x0), 1e-14, 500
    )
    assert converged and n_iter < 500
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-6)


def test_a_fit_stops_only_after_small_steps_in_a_row():
    """With tol = 1 every quasi-Newton step is "small"; the first (steepest descent) never counts."""
    A, b, c = quadratic(20, seed=5)

    def fg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return float(0.5 * x @ A @ x - b @ x + c), A @ x - b

    x0 = torch.zeros(20, dtype=torch.float64)
    _, _, _, n_iter, converged = LBFGS(torch.ones(20, dtype=torch.float64)).minimise(fg, x0, *fg(x0), 1.0, 50)
    assert converged and n_iter == 1 + SMALL_STEPS


@pytest.mark.parametrize("reject", [False, True])
def test_a_path_starts_from_its_secant_extrapolation_when_that_is_lower(reject: bool):
    """Ridge path ``x*(lam) = (A + lam I)^-1 b``: from the third lam on, the first point evaluated is the
    secant through the last two solutions in log lam (unevenly spaced lams); a point that is not lower is
    not taken. Every fit still ends at the exact solution."""
    dim = 30
    A, b, c = quadratic(dim, seed=7)
    lams, lam = [1.0, 0.5, 0.1, 0.02], [0.0]
    evaluated: list[torch.Tensor] = []
    secant: list[torch.Tensor] = []

    def fg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        evaluated.append(x.clone())
        f, g = float(0.5 * x @ A @ x - b @ x + c + lam[0] * x @ x / 2), A @ x - b + lam[0] * x
        if reject and secant and torch.equal(x, secant[-1]):
            f += 1e6  # the secant point is made worse than the start: it must be passed over
        return f, g

    opt, x, solutions = LBFGS(torch.ones(dim, dtype=torch.float64)), torch.zeros(dim, dtype=torch.float64), []
    for i, lam[0] in enumerate(lams):
        opt.set_lam(lam[0])
        if i >= 2:
            ratio = math.log(lams[i] / lams[i - 1]) / math.log(lams[i - 1] / lams[i - 2])
            secant.append(solutions[-1] + (solutions[-1] - solutions[-2]) * ratio)
        f, g = fg(x)
        del evaluated[:]
        first_step = x + copy.deepcopy(opt).direction(g)  # the quasi-Newton step from x, memory untouched
        x, _, _, _, converged = opt.minimise(fg, x, f, g, 1e-15, 500)
        assert converged
        if i >= 2:
            assert torch.equal(evaluated[0], secant[-1])
            # rejected: the fit goes on from the start as if nothing happened; taken: from the secant point
            assert torch.equal(evaluated[1], first_step) == reject
        want = torch.linalg.solve(A + lam[0] * torch.eye(dim, dtype=torch.float64), b)
        torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-7)
        solutions.append(x)

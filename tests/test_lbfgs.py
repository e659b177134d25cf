"""The probe's L-BFGS: its direction is Nocedal and Wright's two-loop recursion on the pairs corrected for a
change of the L2 weight (those that lose their curvature dropped), and it solves a known quadratic."""

from __future__ import annotations

import torch

from bobench.protocols.lbfgs import LBFGS


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
    A, _, _ = pairs(1, 40, seed=3)
    b = torch.randn(40, generator=torch.Generator().manual_seed(4), dtype=torch.float64)

    def fg(x: torch.Tensor) -> tuple[float, torch.Tensor]:
        return float(0.5 * x @ A @ x - b @ x), A @ x - b

    x0 = torch.zeros(40, dtype=torch.float64)
    x, _, _, n_iter, converged = LBFGS(torch.ones(40, dtype=torch.float64)).minimise(
        fg, x0, *fg(x0), 1e-14, 500
    )
    assert converged and n_iter < 500
    torch.testing.assert_close(x, torch.linalg.solve(A, b), rtol=1e-5, atol=1e-6)

"""Full-batch L-BFGS for a regularisation path, the solver of the linear probe
(:mod:`bobench.protocols.linear`).

The solver works on a flat float64 parameter vector and a callable ``fg(x) -> (f, g)``; it knows nothing
about the data. Made for walking a path of L2 weights: the curvature memory survives a change of the weight
(see :meth:`LBFGS.set_lam`), and each fit after the second starts from the path extrapolated through the
two previous solutions when that point is lower (see :meth:`LBFGS.minimise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

__all__ = ["LBFGS"]

HISTORY = 10  # L-BFGS curvature pairs (20 or 40 took as many iterations on the P2 benchmark)
SMALL_STEPS = 2  # quasi-Newton steps in a row that must each lower f by <= tol * f before a fit stops
GRAD_ZERO = 1e-12  # max |gradient| taken as exact convergence (e.g. one class: W = 0 is optimal)


class LBFGS:
    """L-BFGS with a backtracking Armijo line search (enough here: the objective is convex, so every
    pair has positive curvature). The memory carries over from one C to the next: the objectives differ
    only by ``(lam' - lam) ||W||^2 / 2``, whose Hessian is known exactly, so each stored pair is corrected
    (``y += (lam' - lam) s_W``) instead of dropped, and the first step at a new C is already a
    quasi-Newton step on the new objective."""

    def __init__(self, wmask: torch.Tensor) -> None:
        self.wmask, self.lam = wmask, None
        self.S: list[torch.Tensor] = []
        self.Y: list[torch.Tensor] = []
        self.SY: list[float] = []  # s @ y of each pair, computed once (the recursion reads it twice per step)
        self.solutions: list[tuple[float, torch.Tensor]] = []  # (lam, x) where the last two fits ended

    def _keep(self, S: list[torch.Tensor], Y: list[torch.Tensor], SY: list[float]) -> None:
        self.S, self.Y, self.SY = S[-HISTORY:], Y[-HISTORY:], SY[-HISTORY:]

    def set_lam(self, lam: float) -> None:
        if self.lam is not None:
            for s, y in zip(self.S, self.Y, strict=True):
                y.add_(s * self.wmask, alpha=lam - self.lam)
            SY = [float(s @ y) for s, y in zip(self.S, self.Y, strict=True)]
            keep = [sy > 0 for sy in SY]
            self._keep(
                [s for s, k in zip(self.S, keep, strict=True) if k],
                [y for y, k in zip(self.Y, keep, strict=True) if k],
                [sy for sy, k in zip(SY, keep, strict=True) if k],
            )
        self.lam = lam

    def direction(self, g: torch.Tensor) -> torch.Tensor:
        if not self.S:
            return -g / max(float(g.abs().sum()), 1.0)  # no curvature yet: a short steepest-descent step
        q, alphas = -g, []
        for s, y, sy in zip(reversed(self.S), reversed(self.Y), reversed(self.SY), strict=True):
            alphas.append(float(s @ q) / sy)
            q = q - alphas[-1] * y
        d = q * (self.SY[-1] / float(self.Y[-1] @ self.Y[-1]))
        for s, y, sy, a in zip(self.S, self.Y, self.SY, reversed(alphas), strict=True):
            d = d + (a - float(y @ d) / sy) * s
        return d

    def _extrapolate(self, fg: Callable, x: torch.Tensor, f: float, g: torch.Tensor) -> tuple | None:
        """``(x', f', g')`` at the secant extrapolation of the path in ``log lam`` through the last two
        solutions, if ``x`` is the last one and ``f' < f``; the step enters the memory as a curvature pair."""
        if len(self.solutions) < 2 or self.solutions[-1][1] is not x:
            return None
        (lam0, x0), (lam1, _) = self.solutions
        if self.lam == lam1 or lam1 == lam0:  # the same lam again: no path direction to follow
            return None
        # the solution path is smooth in log lam: one secant step of the new lam's distance along it
        xe = x + (x - x0) * (math.log(self.lam / lam1) / math.log(lam1 / lam0))
        fe, ge = fg(xe)
        if not fe < f:
            return None
        s, y = xe - x, ge - g
        sy = float(s @ y)
        if sy > 0:
            self._keep([*self.S, s], [*self.Y, y], [*self.SY, sy])
        return xe, fe, ge

    def minimise(self, fg: Callable, x: torch.Tensor, f: float, g: torch.Tensor, tol: float, max_iter: int):
        """From ``x`` (``f, g = fg(x)``) until ``SMALL_STEPS`` quasi-Newton steps in a row each lower ``f``
        by at most ``tol * f``, the gradient vanishes, the line search finds no decrease, or ``max_iter``.

        Along a path (``x`` the solution the previous call returned, at another lam), the first step goes
        to the secant extrapolation through the last two solutions when it lowers ``f``: on the probe's
        paths it saves about a third of the evaluations (BENCHMARKS.md P2). One small decrease alone is no proof of
        convergence (a short step in a poorly modelled direction); two in a row stopped 3x closer to the
        optimum on real features.

        Returns ``(x, f, g, n_iter, converged)``: ``n_iter`` counts the steps taken (the extrapolation
        among them); converged is False only when ``max_iter`` stopped it."""
        out = self._run(fg, x, f, g, tol, max_iter)
        self.solutions = [*self.solutions, (self.lam, out[0])][-2:]
        return out

    def _run(self, fg: Callable, x: torch.Tensor, f: float, g: torch.Tensor, tol: float, max_iter: int):
        start = 0
        if max_iter > 0 and (jump := self._extrapolate(fg, x, f, g)) is not None:
            (x, f, g), start = jump, 1
        small = 0  # quasi-Newton steps in a row that lowered f by at most tol * f
        for n_iter in range(start, max_iter):
            if float(g.abs().max()) <= GRAD_ZERO:
                return x, f, g, n_iter, True
            newton = bool(self.S)  # a steepest-descent step is short by design: its decrease proves nothing
            d = self.direction(g)
            gtd, t = float(g @ d), 1.0
            if gtd >= 0:  # not a descent direction (rounding): restart from steepest descent
                self._keep([], [], [])
                newton = False
                d = self.direction(g)
                gtd = float(g @ d)
            for _ in range(30):
                f_new, g_new = fg(x + t * d)
                if f_new <= f + 1e-4 * t * gtd:
                    break
                # Minimiser of the quadratic through f, gtd and f_new, kept within [0.1 t, 0.5 t].
                t = min(max(-gtd * t * t / (2 * (f_new - f - gtd * t)), 0.1 * t), 0.5 * t)
            else:
                return x, f, g, n_iter, True  # no decrease left that float arithmetic can see
            s, y = t * d, g_new - g
            sy = float(s @ y)
            if sy > 0:
                self._keep([*self.S, s], [*self.Y, y], [*self.SY, sy])
            x, g, f_old, f = x + s, g_new, f, f_new
            small = small + 1 if newton and f_old - f <= tol * abs(f) else 0
            if small >= SMALL_STEPS:
                return x, f, g, n_iter + 1, True
        return x, f, g, max_iter, False

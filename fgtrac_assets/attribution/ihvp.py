"""Inverse-Hessian-vector products: solve (H + damping I) X = B for every row of B (m, P) at once.

* :class:`ExplicitInverse` -- a dense H factorised once (Cholesky in float64 when
  H + damping I is positive definite, else a symmetric eigendecomposition, which also
  handles an indefinite matrix as long as no eigenvalue is zero).
* :func:`solve_block_cg` -- block conjugate gradients (O'Leary 1980) in the
  breakdown-free form of Ji & Li (2017): all right-hand sides share one growing block
  Krylov space, one block Hessian-vector product per iteration.  On the digits MLP
  (6,570 parameters, 200 test gradients) it matched the exact scores to a correlation
  of 0.9999 after 3 iterations where per-row CG needed ~15.  Optionally preconditioned
  (``precondition``, e.g. :class:`.preconditioner.KroneckerPreconditioner`).
* :func:`solve_cg` -- conjugate gradients run on each row independently, all rows in
  one block product per iteration; rows that have converged are dropped from the block.
* :func:`solve_lissa` -- LiSSA (Agarwal et al. 2017; Koh & Liang 2017): the Neumann
  recursion h <- b + h - (H + damping I) h / scale, X = h / scale, vectorised over the
  rows.  With exact products the update equals the residual b - (H + damping I) X, so
  convergence is checked for free; with sampled (mini-batch) products it runs ``depth``
  steps ``repeat`` times and averages.

Each solver returns the solution and a report dict (iterations, residuals, ...).
"""

from collections.abc import Callable

import torch
from torch import Tensor

__all__ = ["ExplicitInverse", "solve_block_cg", "solve_cg", "solve_lissa"]

Apply = Callable[[Tensor], Tensor]

#: up to this many parameters the explicit path always uses eigh (and reports the spectrum)
EIGEN_LIMIT = 2048


class ExplicitInverse:
    """(H + damping I)^{-1} applied to rows, from a dense symmetric H (P, P)."""

    def __init__(self, hessian: Tensor, damping: float, eigen_limit: int = EIGEN_LIMIT):
        h = hessian.double()
        p = h.shape[0]
        eye = torch.eye(p, dtype=h.dtype, device=h.device)
        self.report: dict = {"params": p, "damping": float(damping)}
        self._chol = self._q = self._w = None
        if p > eigen_limit:
            chol, info = torch.linalg.cholesky_ex(h + damping * eye)
            if int(info) == 0:
                self._chol = chol
                self.report.update(factorization="cholesky", positive_definite=True)
                return
        w, q = torch.linalg.eigh(h)
        shifted = w + damping
        if bool((shifted == 0).any()):
            raise ValueError("H + damping I is singular: increase damping")
        self._w, self._q = shifted, q
        self.report.update(
            factorization="eigh",
            positive_definite=bool((shifted > 0).all()),
            hessian_min_eigenvalue=float(w[0]),
            hessian_max_eigenvalue=float(w[-1]),
            hessian_negative_eigenvalues=int((w < 0).sum()),
            damped_nonpositive_eigenvalues=int((shifted <= 0).sum()),
        )

    def solve(self, rows: Tensor) -> Tensor:
        """Return X (m, P) with (H + damping I) X_i = rows_i, in the dtype of ``rows``."""
        b = rows.double().T
        if self._chol is not None:
            x = torch.cholesky_solve(b, self._chol)
        else:
            x = self._q @ ((self._q.T @ b) / self._w[:, None])
        return x.T.to(rows.dtype)


def _product(apply: Apply, rows: Tensor) -> Tensor:
    """Return apply(rows) as a tensor of its own: the solvers update products in place."""
    out = apply(rows)
    return out.clone() if out.untyped_storage().data_ptr() == rows.untyped_storage().data_ptr() else out


def _orthonormal_basis(z: Tensor, rel_eps: float | None = None) -> tuple[Tensor, Tensor | None]:
    """Return a basis B (r, P) of the span of the rows of z (k, P), orthonormal up to rounding, and B z^T (r, k)
    when it comes for free (no zero rows), else None.

    Rows are scaled to unit norm first (the span is unchanged, and small right-hand
    sides are not dropped next to large ones); directions whose singular value is below
    ``rel_eps`` (default: 10 x the square root of the dtype's epsilon: 3.5e-3 in float32,
    1.5e-7 in float64) are dropped (they stay in the residual, for the next iteration).  The Gram matrix is formed in z's dtype and
    factorised in float64; block CG uses P A P^T of the basis it gets, so orthonormality
    to rounding is all it needs.
    """
    if rel_eps is None:
        rel_eps = 10 * torch.finfo(z.dtype).eps ** 0.5
    norms = z.norm(dim=1, keepdim=True)
    nz = norms[:, 0] > 0
    if not bool(nz.any()):
        return z[:0], None
    full = bool(nz.all())
    z = z / norms if full else z[nz] / norms[nz]
    gram = (z @ z.T).double()
    evals, evecs = torch.linalg.eigh((gram + gram.T) / 2)
    keep = evals > (rel_eps ** 2) * evals.max().clamp_min(0)
    v = evecs[:, keep] / evals[keep].sqrt()
    coords = v.T @ gram * norms[:, 0].double() if full else None  # B z^T = V^T (Z Z^T) diag(norms)
    return v.T.to(z.dtype) @ z, coords


def solve_block_cg(apply: Apply, rhs: Tensor, damping: float, max_iter: int = 100, tol: float = 1e-4,
                   precondition: Apply | None = None) -> tuple[Tensor, dict]:
    """Return (X, report) solving (H + damping I) X_i = rhs_i by block CG over all rows; ``apply(V)`` returns V H.

    ``precondition(V)`` (optional) returns V M for a symmetric positive definite M
    ~ (H + damping I)^{-1}: preconditioned block CG (Ji & Li's breakdown-free BFBPCG),
    same solution, fewer iterations when M is good.  Stops when every row's residual
    norm is below ``tol`` times its right-hand side's norm.  Iterations where the
    projected matrix P (H + damping I) P^T is not positive definite are counted as
    ``negative_curvature`` (raise ``damping``).  Every block is held as rows (vectors x
    parameters), the layout of ``rhs`` and of the products: no transposed copies.
    """
    m = rhs.shape[0]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    bnorm = rhs.norm(dim=1)
    scale = bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny)

    def precond(res: Tensor) -> Tensor:
        return res if precondition is None else precondition(res)

    basis, coords = _orthonormal_basis(precond(r))  # coords = basis @ r.T, unless preconditioned
    if precondition is not None:
        coords = None
    iters, products, negative = 0, 0, 0
    relres = torch.where(bnorm > 0, r.norm(dim=1) / scale, torch.zeros_like(bnorm))
    while iters < int(max_iter) and bool((relres > tol).any()) and basis.shape[0] > 0:
        q = _product(apply, basis).add_(basis, alpha=damping)
        products += basis.shape[0]
        pq = basis @ q.T
        pq = ((pq + pq.T) / 2).double()
        chol, info = torch.linalg.cholesky_ex(pq)
        if int(info) != 0:
            negative += 1
            solve = lambda rhs_: torch.linalg.solve(pq, rhs_)  # noqa: E731
        else:
            solve = lambda rhs_: torch.cholesky_solve(rhs_, chol)  # noqa: E731
        proj = basis @ r.T if coords is None else coords
        coords = None
        alpha = solve(proj.double()).to(rhs.dtype)  # (r, m): coefficients of the basis rows
        x.addmm_(alpha.T, basis)
        r.addmm_(alpha.T, q, alpha=-1.0)
        iters += 1
        relres = torch.where(bnorm > 0, r.norm(dim=1) / scale, torch.zeros_like(bnorm))
        if iters < int(max_iter) and bool((relres > tol).any()):  # the next search directions, only if needed
            z = precond(r)
            beta = -solve((q @ z.T).double()).to(rhs.dtype)
            basis, _ = _orthonormal_basis(torch.addmm(z, beta.T, basis))
    report = {
        "solver": "block_cg" if precondition is None else "block_pcg", "damping": float(damping),
        "max_iter": int(max_iter), "tol": float(tol),
        "iterations_max": iters, "iterations_mean": float(iters),
        "relative_residual_max": float(relres.max()) if m else 0.0,
        "not_converged": int((relres > tol).sum()), "negative_curvature": negative,
        "hessian_vector_products": products,
    }
    return x, report


def solve_cg(apply: Apply, rhs: Tensor, damping: float, max_iter: int = 100, tol: float = 1e-4) -> tuple[Tensor, dict]:
    """Return (X, report) solving (H + damping I) X_i = rhs_i by CG on every row; ``apply(V)`` returns V H.

    A row stops when its residual norm falls below ``tol`` times its right-hand side's
    norm, or when it meets a direction of non-positive curvature (H + damping I not
    positive definite along it: counted in the report; raise ``damping``).
    """
    m = rhs.shape[0]
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    d = r.clone()
    bnorm = rhs.norm(dim=1)
    rs = (r * r).sum(1)
    active = (bnorm > 0) & (rs.sqrt() > tol * bnorm)
    iters = torch.zeros(m, dtype=torch.long, device=rhs.device)  # indexed by rows of rhs: on its device
    negative = torch.zeros(m, dtype=torch.bool, device=rhs.device)
    products = 0
    for _ in range(int(max_iter)):
        idx = active.nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        di = d[idx]
        ad = _product(apply, di).add_(di, alpha=damping)
        products += idx.numel()
        curv = (di * ad).sum(1)
        bad = curv <= 0
        if bool(bad.any()):
            negative[idx[bad]] = True
        alpha = torch.where(bad, torch.zeros_like(curv), rs[idx] / torch.where(bad, torch.ones_like(curv), curv))
        x[idx] += alpha[:, None] * di
        ri = r[idx] - alpha[:, None] * ad
        r[idx] = ri
        rs_new = (ri * ri).sum(1)
        beta = rs_new / rs[idx].clamp_min(torch.finfo(rs.dtype).tiny)
        d[idx] = ri + beta[:, None] * di
        rs[idx] = rs_new
        iters[idx] += 1
        active[idx] = (rs_new.sqrt() > tol * bnorm[idx]) & ~bad
    relres = torch.where(bnorm > 0, rs.sqrt() / bnorm.clamp_min(torch.finfo(bnorm.dtype).tiny), torch.zeros_like(bnorm))
    report = {
        "solver": "cg", "damping": float(damping), "max_iter": int(max_iter), "tol": float(tol),
        "iterations_max": int(iters.max()) if m else 0, "iterations_mean": float(iters.float().mean()) if m else 0.0,
        "relative_residual_max": float(relres.max()) if m else 0.0,
        "not_converged": int(((relres > tol) & ~negative).sum()),
        "negative_curvature": int(negative.sum()), "hessian_vector_products": products,
    }
    return x, report


def solve_lissa(
    apply: Apply,
    rhs: Tensor,
    damping: float,
    scale: float,
    depth: int = 1000,
    tol: float = 1e-4,
    stochastic: bool = False,
    repeat: int = 1,
    max_restarts: int = 3,
) -> tuple[Tensor, dict]:
    """Return (X, report) approximating (H + damping I)^{-1} rhs_i by LiSSA's Neumann recursion on every row.

    Converges when every eigenvalue of (H + damping I) / scale lies in (0, 2).  A run
    whose residual grows 1000-fold or overflows is restarted with ``scale`` doubled (at
    most ``max_restarts`` times; the report says so).  ``stochastic`` means ``apply``
    returns a sampled estimate of V H: no early stop, ``repeat`` runs averaged.
    """
    if scale <= 0:
        raise ValueError("LiSSA scale must be positive")
    restarts = 0
    while True:
        try:
            x, report = _lissa(apply, rhs, damping, scale, depth, tol, stochastic, repeat)
            report["restarts"] = restarts
            return x, report
        except _Diverged:
            if restarts >= max_restarts:
                raise RuntimeError(
                    f"LiSSA diverged with scale={scale:g}: (H + damping I) has eigenvalues above 2*scale or below 0 "
                    "(raise `scale`, or `damping` if the Hessian is indefinite)"
                ) from None
            restarts += 1
            scale *= 2.0


class _Diverged(RuntimeError):
    pass


def _lissa(apply, rhs, damping, scale, depth, tol, stochastic, repeat):
    m = rhs.shape[0]
    bnorm = rhs.norm(dim=1).clamp_min(torch.finfo(rhs.dtype).tiny)
    runs = max(1, int(repeat)) if stochastic else 1
    total = torch.zeros_like(rhs)
    products, steps_run = 0, 0
    relres = torch.zeros(m, dtype=rhs.dtype, device=rhs.device)
    for _ in range(runs):
        h = rhs.clone()
        active = rhs.norm(dim=1) > 0
        for step in range(int(depth)):
            # every row still active (or sampled products): the whole block, no gather / scatter
            idx = None if stochastic or bool(active.all()) else active.nonzero().squeeze(1)
            hi = h if idx is None else h[idx]
            if hi.shape[0] == 0:
                break
            bi = rhs if idx is None else rhs[idx]
            # b - (H + damping I) h / scale, in place on the product: the residual of X = h / scale
            update = _product(apply, hi).add_(hi, alpha=damping).mul_(-1.0 / scale).add_(bi)
            products += hi.shape[0]
            rr = update.norm(dim=1) / (bnorm if idx is None else bnorm[idx])
            if not bool(torch.isfinite(rr).all()) or float(rr.max()) > 1e3:
                raise _Diverged()
            if idx is None:
                h += update
                relres = rr
                if not stochastic:
                    active = rr > tol
            else:
                h[idx] = hi + update
                relres[idx] = rr
                active[idx] = rr > tol
            steps_run = max(steps_run, step + 1)
        total += h
    x = total / (runs * scale)
    report = {
        "solver": "lissa", "damping": float(damping), "scale": float(scale), "depth": int(depth),
        "steps": steps_run, "stochastic": bool(stochastic), "repeat": runs, "tol": float(tol),
        "hessian_vector_products": products,
        # exact products: the residual of the returned X; sampled: of the last sampled step only
        "relative_residual_max": float(relres.max()) if m else 0.0,
        "not_converged": int((relres > tol).sum()) if not stochastic else None,
    }
    return x, report

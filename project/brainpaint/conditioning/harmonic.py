"""Classical 3D harmonic (Laplace) fill: the no-network baseline and the optional prior.

Inside the mask the fill solves Laplace's equation on the 6-neighbour voxel grid, with the
known voxels around the mask as Dirichlet boundary values: every filled voxel becomes the mean
of its neighbours. It is the smoothest interpolation of the surrounding tissue, has no
parameters, and runs on a CPU in seconds, so it is both the reference every learned model must
beat and a usable answer where no GPU is available.

Boundary values. All known voxels count, including the zero background: where a mask reaches
the edge of the brain the fill decays towards zero, which is what the voided image says is
there. Where the mask reaches the edge of the grid, the missing neighbour is simply left out
(zero-flux boundary).

Solver. Only the mask voxels are unknowns, so the system has one row per mask voxel (up to a
few hundred thousand). The matrix is the graph Laplacian restricted to the mask, symmetric
positive definite whenever any known voxel exists, and is solved with conjugate gradients
(scipy.sparse), started from the mean of the boundary values. The tolerance is far below the
resolution of any on-disk dtype. Should the solver stop at `MAX_ITER` iterations short of it,
its last iterate (a smooth, bounded estimate) is used, and `notes` is told so.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import sparse
from scipy.sparse import linalg as splinalg
from threadpoolctl import threadpool_limits

RTOL = 1e-7
MAX_ITER = 5000


def laplacian_system(volume: np.ndarray, mask: np.ndarray) -> tuple[sparse.csr_matrix, np.ndarray, np.ndarray]:
    """Build (A, b, flat_index) for the unknowns `volume[mask]`: A u = b, A = degree - adjacency."""
    shape = mask.shape
    flat = np.flatnonzero(mask.ravel())
    n = flat.size
    index = np.full(mask.size, -1, dtype=np.int64)
    index[flat] = np.arange(n)
    coords = np.unravel_index(flat, shape)
    values = np.asarray(volume, dtype=np.float64).ravel()
    strides = np.array([int(np.prod(shape[a + 1 :])) for a in range(len(shape))])

    degree = np.zeros(n)
    rhs = np.zeros(n)
    rows, cols = [], []
    for axis in range(len(shape)):
        for step in (-1, 1):
            pos = coords[axis] + step
            inside = (pos >= 0) & (pos < shape[axis])
            me = np.flatnonzero(inside)
            neighbour = flat[me] + step * strides[axis]
            degree[me] += 1
            j = index[neighbour]
            unknown = j >= 0
            rows.append(me[unknown])
            cols.append(j[unknown])
            np.add.at(rhs, me[~unknown], values[neighbour[~unknown]])
    rows = np.concatenate(rows)
    cols = np.concatenate(cols)
    adjacency = sparse.csr_matrix((np.ones(rows.size), (rows, cols)), shape=(n, n))
    return (sparse.diags(degree) - adjacency).tocsr(), rhs, flat


def mask_support(mask: np.ndarray) -> tuple[slice, ...]:
    """The bounding box of a non-empty `mask` grown by one voxel (within the grid): every voxel
    a harmonic fill of the mask reads, so filling that box alone gives the same values."""
    idx = np.argwhere(mask)
    return tuple(slice(max(int(lo) - 1, 0), min(int(hi) + 2, n)) for lo, hi, n in zip(idx.min(0), idx.max(0), mask.shape))


def harmonic_fill(volume: np.ndarray, mask: np.ndarray, rtol: float = RTOL, notes: Optional[list[str]] = None) -> np.ndarray:
    """Return a float32 copy of `volume` whose voxels inside `mask` solve Laplace's equation with
    the voxels outside as boundary values; voxels outside the mask are unchanged. A solve that
    stops short of `rtol` adds a line saying so to `notes`."""
    volume = np.asarray(volume)
    mask = np.asarray(mask, dtype=bool)
    if volume.shape != mask.shape:
        raise ValueError(f"volume {volume.shape} and mask {mask.shape} differ in shape")
    out = volume.astype(np.float32, copy=True)
    if not mask.any():
        return out
    if mask.all():
        raise ValueError("the mask covers the whole volume: there is nothing to fill from")
    support = mask_support(mask)  # the system of the mask's box is the system of the grid
    A, b, flat = laplacian_system(volume[support], mask[support])
    # Start from the mean boundary value: b sums the known neighbours of each unknown, and
    # degree minus unknown neighbours counts them.
    diag = A.diagonal()
    known_links = diag.sum() - (A.nnz - b.size)
    x0 = np.full(b.size, b.sum() / max(known_links, 1.0))
    jacobi = splinalg.LinearOperator(A.shape, matvec=lambda r: r / diag, dtype=np.float64)
    # The vectors are short: BLAS threads only contend (3x slower beside a busy torch or another job).
    with threadpool_limits(1, user_api="blas"):
        u, info = splinalg.cg(A, b, x0=x0, rtol=rtol, atol=0.0, maxiter=MAX_ITER, M=jacobi)
    if info != 0 and notes is not None:
        residual = float(np.linalg.norm(b - A @ u) / max(float(np.linalg.norm(b)), 1e-30))
        how = f"after {info} iterations" if info > 0 else "on a breakdown"
        notes.append(f"harmonic fill of {b.size} voxels did not converge: the solver stopped {how} at relative "
                     f"residual {residual:.1e} (tolerance {rtol:g}); its last iterate is used")
    out[support][mask[support]] = u.astype(np.float32)  # boolean indexing walks voxels in C order, like `flat`
    return out

"""The nearest-centroid step of distributed_kmeans on each rank's shard, by backend: a FAISS flat index (CPU or
GPU) or pseudo_labels.nearest_centroids (plain torch, used on the GPU when FAISS has none)."""

from __future__ import annotations

import numpy as np
import torch

from brcd_dist.clustering.pseudo_labels import nearest_centroids

BACKENDS = ("faiss-gpu", "faiss-cpu", "torch-cuda", "torch-cpu")


def _faiss():
    try:
        import faiss

        return faiss
    except ImportError:
        return None


def choose_backend() -> str:
    """FAISS on the GPU when it has GPU support; else torch matmul on the GPU when CUDA is there; else FAISS on the
    CPU (torch on the CPU only if FAISS is missing)."""
    faiss = _faiss()
    if faiss is not None and faiss.get_num_gpus() > 0:
        return "faiss-gpu"
    if torch.cuda.is_available():
        return "torch-cuda"
    return "faiss-cpu" if faiss is not None else "torch-cpu"


class CentroidAssigner:
    """Nearest centroid of each local point, by the chosen backend: (labels int64, squared L2 distance float32)."""

    def __init__(self, backend: str, d: int, spherical: bool, device: torch.device):
        self.backend, self.spherical, self.device = backend, spherical, device
        if backend.startswith("faiss"):
            faiss = _faiss()
            if backend == "faiss-gpu":
                import faiss.contrib.torch_utils  # noqa: F401  lets FAISS GPU indexes read torch CUDA tensors in place

                self._res = faiss.StandardGpuResources()
                cfg = faiss.GpuIndexFlatConfig()
                cfg.device = device.index or 0
                self.index = (faiss.GpuIndexFlatIP if spherical else faiss.GpuIndexFlatL2)(self._res, d, cfg)
            else:
                self.index = faiss.IndexFlatIP(d) if spherical else faiss.IndexFlatL2(d)

    def __call__(
        self, x: torch.Tensor, x_sq: torch.Tensor | None, centroids: np.ndarray
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[0] == 0:
            return torch.empty(0, dtype=torch.int64, device=x.device), torch.empty(0, device=x.device)
        if self.backend.startswith("torch"):
            return nearest_centroids(x, torch.as_tensor(centroids, device=x.device), spherical=self.spherical)
        self.index.reset()
        c_sq = (centroids.astype(np.float64) ** 2).sum(1)
        if self.backend == "faiss-gpu":
            self.index.add(torch.as_tensor(centroids, device=x.device))
            dis, lab = self.index.search(x, 1)
            dis, lab = dis[:, 0], lab[:, 0]
            if self.spherical:  # IndexFlatIP returned x.c: turn it into ||x||² - 2 x.c + ||c||²
                c_sq_t = torch.as_tensor(c_sq, device=x.device)
                dis = (x_sq + c_sq_t[lab] - 2 * dis.double()).clamp_min(0).float()
            return lab, dis
        self.index.add(centroids)
        dis, lab = self.index.search(x.numpy(), 1)
        dis, lab = dis[:, 0], lab[:, 0]
        if self.spherical:  # numpy, not torch, on the CPU: see _local_stats
            dis = np.maximum(x_sq.numpy() + c_sq[lab] - 2 * dis.astype(np.float64), 0).astype(np.float32)
        return torch.from_numpy(lab), torch.from_numpy(np.ascontiguousarray(dis))

"""Loads the CMake-built op library into torch and checks each op against plain torch."""
import sys

import torch

torch.ops.load_library(sys.argv[1])
ops = torch.ops.chameleon
g = torch.Generator().manual_seed(0)
h = torch.randn(4, 9, 6, generator=g)
m = torch.rand(4, 9, generator=g) > 0.3
m[1] = False
mf = m.float()
expected = (h * mf[..., None]).sum(1) / mf.sum(1, keepdim=True).clamp_min(1)
torch.testing.assert_close(ops.masked_mean_pool(h, m), expected)
sums, counts = ops.domain_mean_pool(h, m, torch.tensor([0, 1, 1, 0]), 2)
torch.testing.assert_close(sums, torch.stack([expected[0] + expected[3], expected[2]]))
assert counts.tolist() == [2, 1]
X = torch.randn(8, 3, dtype=torch.float64, generator=g)
Hm = torch.eye(8, dtype=torch.float64) - 1 / 8
Kc = Hm @ (X @ X.T) @ Hm
S = torch.linalg.solve(Kc + 8 * torch.eye(8, dtype=torch.float64), Kc).diagonal()
lam = torch.tensor(1.0, dtype=torch.float64)  # the krls.lam_tensor overload (a float lam takes the default overload)
torch.testing.assert_close(ops.krls(X @ X.T, lam), S)
S_ex, info = ops.krls_ex(X @ X.T, lam)
torch.testing.assert_close(S_ex, S)
assert info.item() == 0
print(f"cmake-built {sys.argv[1]}: masked_mean_pool, domain_mean_pool, krls, krls_ex OK")

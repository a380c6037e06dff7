"""Import-and-call smoke test for an installed wheel (run outside the source tree)."""
import os

import torch

import chameleon_ext

assert "site-packages" in chameleon_ext.__file__, f"imported the source tree, not the wheel: {chameleon_ext.__file__}"
info = chameleon_ext.build_info()
print("build_info:", info)
assert info["version"] == chameleon_ext.__version__ and info["torch_version"] == torch.__version__
h = torch.randn(3, 5, 4)
m = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
out = chameleon_ext.masked_mean_pool(h, m)
torch.testing.assert_close(out[0], h[0, :2].mean(0))
assert torch.equal(out[1], torch.zeros(4))
X = torch.randn(5, 3, dtype=torch.float64)
w = chameleon_ext.weights_from_embeddings(X).weights
assert abs(w.sum().item() - 1) < 1e-12 and torch.all(w > 0)
print("wheel smoke test OK:", os.path.basename(chameleon_ext._C.__file__))

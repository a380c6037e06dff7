"""The fake (meta) kernels of chameleon_ext.ops against the real CPU kernels: every check on
shapes, dtypes and argument values that the compiled kernels make (csrc/checks.h), the fake
kernels make too, with the same ValueError and message, so an input the real op refuses never
traces under torch.compile or FakeTensorMode (and a meta-tensor call fails the same way). The
checks that read tensor values (a domain id outside [0, D), NaN in K) are the real kernels'
alone and are tested with them."""

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import chameleon_ext  # noqa: F401  (registers the ops and their fake kernels)

ops = torch.ops.chameleon
H3 = torch.randn(2, 3, 4)
M = torch.ones(2, 3, dtype=torch.bool)
IDS = torch.tensor([0, 1])
K = torch.eye(3, dtype=torch.float64).expand(2, 3, 3).contiguous()

# (case id, op overload, args): each one is refused by the real CPU kernel
ERROR_CASES = [
    ("pool hidden 2-d", ops.masked_mean_pool.default, (torch.randn(2, 3), None)),
    ("pool hidden int64", ops.masked_mean_pool.default, (torch.zeros(2, 3, 4, dtype=torch.int64), None)),
    ("pool hidden complex", ops.masked_mean_pool.default, (torch.zeros(2, 3, 4, dtype=torch.complex64), None)),
    ("pool mask shape", ops.masked_mean_pool.default, (H3, torch.ones(2, 4, dtype=torch.bool))),
    ("pool mask 3-d", ops.masked_mean_pool.default, (H3, torch.ones(2, 3, 1, dtype=torch.bool))),
    ("pool mask float", ops.masked_mean_pool.default, (H3, torch.ones(2, 3))),
    ("domain hidden 4-d", ops.domain_mean_pool.default, (torch.randn(2, 3, 4, 1), M, IDS, 2)),
    ("domain mask shape", ops.domain_mean_pool.default, (H3, torch.ones(3, 3, dtype=torch.bool), IDS, 2)),
    ("domain num_domains 0", ops.domain_mean_pool.default, (H3, M, IDS, 0)),
    ("domain num_domains -3", ops.domain_mean_pool.default, (H3, None, IDS, -3)),
    ("domain ids 2-d", ops.domain_mean_pool.default, (H3, M, IDS.view(2, 1), 2)),
    ("domain ids length", ops.domain_mean_pool.default, (H3, M, torch.tensor([0, 1, 1]), 2)),
    ("domain ids float", ops.domain_mean_pool.default, (H3, M, IDS.float(), 2)),
    ("domain ids bool", ops.domain_mean_pool.default, (H3, M, IDS.bool(), 2)),
]
for name, packet in (("krls", ops.krls), ("krls_ex", ops.krls_ex)):
    for overload, lam in (("default", 1.0), ("lam_tensor", torch.tensor(1.0, dtype=torch.float64))):
        op = getattr(packet, overload)
        ERROR_CASES += [
            (f"{name}.{overload} K 1-d", op, (torch.ones(3, dtype=torch.float64), lam)),
            (f"{name}.{overload} K not square", op, (torch.ones(2, 3, 4, dtype=torch.float64), lam)),
            (f"{name}.{overload} K k=0", op, (torch.ones(2, 0, 0, dtype=torch.float64), lam)),
            (f"{name}.{overload} K float16", op, (K.half(), lam)),
            (f"{name}.{overload} K int64", op, (K.long(), lam)),
        ]
    ERROR_CASES += [(f"{name} lam {v}", packet.default, (K, v)) for v in (0.0, -1.0, float("nan"), float("inf"))]
    ERROR_CASES += [
        (f"{name}.lam_tensor lam bool", packet.lam_tensor, (K, torch.tensor([True, False]))),
        (f"{name}.lam_tensor lam complex", packet.lam_tensor, (K, torch.ones(2, dtype=torch.complex64))),
        (f"{name}.lam_tensor lam shape", packet.lam_tensor, (K, torch.ones(3, dtype=torch.float64))),
        (f"{name}.lam_tensor lam too many dims", packet.lam_tensor, (K, torch.ones(1, 2, dtype=torch.float64))),
    ]


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0]


def _fake_call(op, args):
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        return op(*fake)


@pytest.mark.parametrize("name,op,args", ERROR_CASES, ids=[c[0] for c in ERROR_CASES])
def test_fake_kernel_refuses_what_the_real_kernel_refuses(name, op, args):
    with pytest.raises(ValueError) as real:
        op(*args)
    with pytest.raises(ValueError) as fake:
        _fake_call(op, args)
    assert _first_line(fake.value) == _first_line(real.value)


@pytest.mark.parametrize(
    "op,args",
    [
        (ops.masked_mean_pool.default, (H3.to(torch.bfloat16), M.int())),
        (ops.domain_mean_pool.default, (H3.double(), None, IDS.int(), 3)),
        (ops.krls.default, (K.float(), 2)),
        (ops.krls_ex.lam_tensor, (K.expand(4, 2, 3, 3), torch.tensor([[1.0], [2.0], [3.0], [4.0]]))),
        (ops.krls.lam_tensor, (K, torch.tensor([1, 2]))),
    ],
)
def test_fake_kernel_accepts_what_the_real_kernel_accepts(op, args):
    real = op(*args)
    fake = _fake_call(op, args)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    assert [(t.shape, t.dtype, t.device) for t in fake] == [(t.shape, t.dtype, t.device) for t in real]


def test_meta_tensors_are_refused_like_real_ones():
    """A call with meta tensors runs the fake kernel: num_domains = 0 is refused there too."""
    with pytest.raises(ValueError, match=r"num_domains must be >= 1, got 0"):
        ops.domain_mean_pool.default(H3.to("meta"), None, IDS.to("meta"), 0)
    with pytest.raises(ValueError, match=r"lam must be a finite number > 0, got -2"):
        ops.krls.default(K.to("meta"), -2.0)

"""attention_entropy benchmarks, side by side per case (pytest-benchmark group = case):

- ``eager_naive``: ``-(p * p.log()).nansum(-1)`` (or ``log_softmax`` for logits) in float32,
  materialising full-size temporaries;
- ``geocap_torch``: our PyTorch path (chunked, output check included);
- ``geocap_triton``: our Triton kernel (CUDA only; interpreter timings on CPU say nothing).

Run: ``python -m pytest bench/test_bench_entropy.py --benchmark-only -q``. On CUDA the shape
is 4*8*2048 rows x 2048 (attention maps of 4 images x 8 heads x 2048 queries) and each timed
call synchronises; on CPU it is 4*8*256 x 256. extra_info records the bytes read from x and
the achieved bandwidth, and on CUDA its fraction of ``GEOCAP_PEAK_BW_GBPS`` (default 4800, H200).
"""
import os

import pytest
import torch

from geocap.kernels.entropy import attention_entropy

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
SHAPE = (4 * 8 * 2048, 2048) if CUDA else (4 * 8 * 256, 256)
PEAK_GBPS = float(os.environ.get("GEOCAP_PEAK_BW_GBPS", "4800"))


def eager_naive(x: torch.Tensor, from_logits: bool) -> torch.Tensor:
    if from_logits:
        logp = x.float().log_softmax(-1)
        return -(logp.exp() * logp).sum(-1)
    p = x.float()
    return -(p * p.log()).nansum(-1)


VARIANTS = {
    "eager_naive": eager_naive,
    "geocap_torch": lambda x, from_logits: attention_entropy(x, from_logits=from_logits, backend="torch"),
    "geocap_triton": lambda x, from_logits: attention_entropy(x, from_logits=from_logits, backend="triton"),
}
CASES = {  # name: (dtype, from_logits)
    "probs-fp16": (torch.float16, False),
    "probs-fp32": (torch.float32, False),
    "logits-fp16": (torch.float16, True),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_entropy(benchmark, variant, case):
    if variant == "geocap_triton" and not CUDA:
        pytest.skip("the Triton kernel is timed on CUDA only: Triton-interpreter timings on CPU are meaningless")
    dtype, from_logits = CASES[case]
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.randn(SHAPE, generator=gen, device=DEVICE) * 3
    x = (x if from_logits else x.softmax(-1)).to(dtype)
    fn = VARIANTS[variant]

    def run():
        out = fn(x, from_logits)
        if CUDA:
            torch.cuda.synchronize()
        return out

    run()  # warm-up: Triton compilation, allocator
    benchmark.group = f"entropy {case} {list(SHAPE)} {DEVICE.type}"
    benchmark(run)

    nbytes = x.numel() * x.element_size()
    gbps = nbytes / benchmark.stats.stats.mean / 1e9
    benchmark.extra_info.update(
        variant=variant,
        case=case,
        shape=list(SHAPE),
        dtype=str(dtype).replace("torch.", ""),
        device=torch.cuda.get_device_name() if CUDA else f"cpu ({torch.get_num_threads()} threads)",
        bytes_read=nbytes,
        achieved_gbps=round(gbps, 2),
    )
    if CUDA:
        benchmark.extra_info.update(peak_gbps=PEAK_GBPS, fraction_of_peak=round(gbps / PEAK_GBPS, 3))

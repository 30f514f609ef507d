"""Kernel time, host time and kernels per call, one JSON record per measurement.

    python bench/gpu_timing.py OUT.json [--dry-run] [--deadline-s S]

Run it first on an idle host (bench/gpu_check.sh does, before the test suite). Each case is
measured three ways:

- ``kernel_ms``: device time of one call: ``triton.testing.do_bench`` (median of its repetitions,
  the L2 cache flushed between them) on CUDA; on the CPU (``--dry-run``) the median of a few timed calls;
- ``host_us_checks_on`` / ``host_us_checks_off``: host time per call, 200 calls (``--dry-run``: 5)
  issued without synchronising, timed before the final synchronisation; box value checks on and
  off (only geocap has checks);
- ``kernels_per_call``: device kernels of one call from ``torch.profiler`` (CUDA activity) on a
  GPU; on the CPU the aten kernels of ``geocap.kernels.op_count.count_ops``.

Cases: attention (geocap, eager, ``sdpa_bias``, ``sdpa_ort_bias``: bench/test_bench_attention.py's
runners) at N = 36 (B = 64 and 1024), 100 (32), 512 (4), 2048 (4), fp16 and bf16, forward and
forward+backward; then the entropy kernel alone on [65536, 2048] probabilities (fp16, fp32): the
public call, the kernel with its autotuned configuration (``tuned_config``; null on the dry run), a
small (block_r, block_l) sweep of fixed tiles, a sweep of the persistent grid's programs per SM,
and a device-to-device copy of the same bytes as the bandwidth reference. ``--dry-run`` runs every
code path on the CPU with tiny shapes (N = 4, 8; B = 2; float32; the Triton paths under the
interpreter), so that the GPU run cannot fail on a script bug.

The JSON (a list of records) is rewritten after every measurement (temporary name, then renamed),
so a run cut short keeps what it measured. Records past ``--deadline-s`` are not started.
Then training steps at ORT's size (:func:`training_records`: 6 layers, d_model 512; geocap's trainer
step beside the ORT-style step on the same weights; float32 with TF32 off and on, bf16 autocast;
the equal-work gradient agreement recorded, not asserted). FlexAttention is timed by gpu_check.sh's
last stage (compiled in a background process from the start).
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _attention_bench():
    """bench/test_bench_attention.py as a module (its runners and input maker)."""
    if str(HERE) not in sys.path:               # its sibling imports (bench/memory.py), also under PYTHONSAFEPATH
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("geocap_bench_attention", HERE / "test_bench_attention.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Recorder:
    """Collects records and rewrites ``path`` after each one (write to a temporary name, rename)."""

    def __init__(self, path: Path, deadline_s: float):
        self.path, self.records = path, []
        path.parent.mkdir(parents=True, exist_ok=True)
        self.start, self.deadline_s = time.monotonic(), deadline_s

    def time_left(self) -> bool:
        return time.monotonic() - self.start < self.deadline_s

    def add(self, record: dict) -> None:
        record["elapsed_s"] = round(time.monotonic() - self.start, 1)
        self.records.append(record)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.records, indent=1))
        os.replace(tmp, self.path)
        print(json.dumps(record), flush=True)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def kernel_ms(call, device: torch.device, dry_run: bool) -> float:
    """Median device time of one call in ms (do_bench on CUDA, timed calls on the CPU)."""
    if device.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    times = []
    for _ in range(3 if dry_run else 20):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def host_us(call, device: torch.device, calls: int) -> float:
    """Host time per call (us): ``calls`` calls issued back to back, timed before the final sync."""
    call()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(calls):
        call()
    host = time.perf_counter() - t0
    _sync(device)
    return host / calls * 1e6


def kernels_per_call(call, device: torch.device) -> int:
    """Device kernels of one call (torch.profiler, CUDA) or aten kernels (count_ops, CPU)."""
    if device.type == "cuda":
        from torch.profiler import ProfilerActivity, profile

        _sync(device)
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            call()
            _sync(device)
        return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    from geocap.kernels.op_count import count_ops

    with count_ops() as counts:
        call()
    return counts.kernels + counts.triton_launches


def _geocap_triton(q, k, v, boxes, wg_weight, wg_bias, attention_mask):
    from geocap.kernels import geo_attention

    return geo_attention(q, k, v, boxes, wg_weight, wg_bias, attention_mask, backend="triton").out


def _attention_call(bench, variant: str, inputs: dict, backward: bool):
    # geocap on its Triton path everywhere (on CUDA that is backend="auto"; the dry run interprets it)
    fn = _geocap_triton if variant == "geocap" else bench.RUNNERS[variant]
    if not backward:
        def call():
            with torch.no_grad():
                return fn(**inputs)
        return call
    wrt = [inputs[n] for n in bench.GRAD_INPUTS]
    grad_out = torch.ones_like(inputs["q"])

    def call():
        return torch.autograd.grad(fn(**inputs), wrt, grad_out)
    return call


def attention_records(rec: Recorder, device: torch.device, dry_run: bool) -> None:
    from geocap.kernels import value_checks

    bench = _attention_bench()
    shapes = [(4, 2), (8, 2)] if dry_run else [(36, 64), (36, 1024), (100, 32), (512, 4), (2048, 4)]
    dtypes = [torch.float32] if dry_run else [torch.float16, torch.bfloat16]
    variants = ("geocap", "eager", "sdpa_bias", "sdpa_ort_bias")
    calls = 2 if dry_run else 200
    for n, batch in shapes:
        for dtype in dtypes:
            for pass_ in ("fwd", "fwd+bwd"):
                for variant in variants:
                    if not rec.time_left():
                        return
                    if variant == "eager" and n >= 2048 and not dry_run:
                        continue                          # [B, N, N, 64] embedding: ~4 GB at N = 2048
                    backward = pass_ == "fwd+bwd"
                    inputs = bench.make_inputs(batch, n, dtype, device, requires_grad=backward, seed=n)
                    call = _attention_call(bench, variant, inputs, backward)
                    record = dict(kind="attention", variant=variant, N=n, B=batch, H=bench.H, d=bench.D,
                                  dtype=str(dtype).replace("torch.", ""), pass_=pass_, device=device.type)
                    try:
                        with value_checks(False):
                            record["kernel_ms"] = kernel_ms(call, device, dry_run)
                            record["host_us_checks_off"] = host_us(call, device, calls)
                            record["kernels_per_call"] = kernels_per_call(call, device)
                        if variant == "geocap":
                            record["host_us_checks_on"] = host_us(call, device, calls)
                    except Exception as exc:                       # recorded, not fatal: the next case runs
                        record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    rec.add(record)
                    del inputs, call
                    if device.type == "cuda":
                        torch.cuda.empty_cache()


def entropy_records(rec: Recorder, device: torch.device, dry_run: bool) -> None:
    from geocap.kernels import attention_entropy
    from geocap.kernels import triton_entropy as te

    rows, length = (64, 32) if dry_run else (65536, 2048)
    # (block_r, block_l, programs per SM); None: the default (autotuned tile, PROGRAMS_PER_SM)
    sweep = [(None, None, None), (1, 16, None), (2, 16, None), (None, None, 1)] if dry_run else [
        (None, None, None), (1, 1024, None), (1, 2048, None), (2, 1024, None), (4, 512, None), (8, 256, None),
        (None, None, 1), (None, None, 2), (None, None, 8)]
    cap = te.max_programs(device)
    sms = cap // te.PROGRAMS_PER_SM if device.type == "cuda" else None          # None: interpreter
    for dtype in ([torch.float32] if dry_run else [torch.float16, torch.float32]):
        if not rec.time_left():
            return
        x = torch.softmax(torch.randn(rows, length, device=device, dtype=torch.float32), -1).to(dtype)
        nbytes = x.numel() * x.element_size() + rows * 4
        base = dict(kind="entropy", rows=rows, L=length, dtype=str(dtype).replace("torch.", ""), device=device.type,
                    bytes=nbytes, fixed_blocks=list(te.block_sizes(rows, length)), sm_count=sms,
                    default_programs=cap)
        public = lambda: attention_entropy(x, check_finite=False)          # noqa: E731
        checked = lambda: attention_entropy(x)                             # noqa: E731
        record = dict(base, what="public call", kernel_ms=kernel_ms(public, device, dry_run),
                      checked_call_ms=kernel_ms(checked, device, dry_run), tuned_config=te.tuned_config())
        record["GB_per_s"] = nbytes / (record["kernel_ms"] * 1e-3) / 1e9
        rec.add(record)
        for block_r, block_l, programs_per_sm in sweep:
            if not rec.time_left():
                return
            programs = None if programs_per_sm is None else programs_per_sm * (sms or 1)
            alone = lambda: te.triton_attention_entropy(x, block_r=block_r, block_l=block_l,   # noqa: E731
                                                        programs=programs)
            ms = kernel_ms(alone, device, dry_run)
            tuned = te.tuned_config() if block_r is None and block_l is None else None
            rec.add(dict(base, what="kernel alone", block_r=block_r, block_l=block_l,
                         programs=programs or cap, tuned_config=tuned, kernel_ms=ms,
                         GB_per_s=nbytes / (ms * 1e-3) / 1e9))
        y = torch.empty_like(x)
        ms = kernel_ms(lambda: y.copy_(x), device, dry_run)
        rec.add(dict(base, what="device-to-device copy (reference)", kernel_ms=ms,
                     GB_per_s=2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9))


def _captioner_bench():
    """bench/test_bench_captioner.py as a module (its input makers, ORT-style model and steps)."""
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))
    spec = importlib.util.spec_from_file_location("geocap_bench_captioner", HERE / "test_bench_captioner.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ORT's size (Herdade et al.: 6 layers, d_model 512, 8 heads, d_ff 2048, 2048-d detector features)
ORT_SIZE = dict(vocab_size=10000, feature_dim=2048, layers=6, d_model=512, heads=8, d_ff=2048, dropout=0.1,
                max_len=64)
DRY_SIZE = dict(ORT_SIZE, layers=2, d_model=64, heads=4, d_ff=128)


def _gradient_agreement(cap, model, images, captions, lengths) -> dict:
    """Equal work, recorded (not asserted): geocap's and the ORT-style step's loss and gradients on
    the same weights (eval mode: no dropout), the largest gradient difference relative to the
    ORT-style gradient's largest value (floored at 1e-4 of the largest gradient of all), over all
    parameters."""
    results = cap._grads_of_step(model, images, captions, lengths)
    (ref_loss, ref_grads), (loss, grads) = results["ort_style"], results["geocap"]
    # floor: 1e-4 of the largest gradient anywhere (some gradients are 0 in exact arithmetic, e.g. the
    # key projections' bias, which softmax ignores: both sides are rounding noise there)
    floor = 1e-4 * max(r.abs().max().item() for r in ref_grads)
    worst, where = 0.0, None
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        rel = (g - r).abs().max().item() / max(r.abs().max().item(), floor, 1e-30)
        if rel > worst:
            worst, where = rel, name
    return {"loss_geocap": float(loss), "loss_ort_style": float(ref_loss),
            "max_relative_grad_difference": worst, "at_parameter": where}


def training_records(rec: Recorder, device: torch.device, dry_run: bool) -> None:
    """Training steps at ORT's size: geocap's trainer step and the ORT-style step (bench/ort_style.py)
    on the same weights, 10 images x 5 captions (N = 36, 20-36 real boxes), AdamW, in float32 with
    TF32 off, float32 with TF32 on, and bf16 autocast; step time (median of timed steps, synchronised),
    peak memory, and the equal-work gradient agreement recorded (float32, TF32 off), not asserted."""
    from geocap.model import ObjectRelationTransformer, ORTConfig
    from geocap.train import make_optimizer

    cap = _captioner_bench()
    size = DRY_SIZE if dry_run else ORT_SIZE
    images_n, steps = (2, 2) if dry_run else (cap.TRAIN_IMAGES, 10)
    torch.manual_seed(0)
    model = ObjectRelationTransformer(ORTConfig(**size)).to(device)
    images = cap.make_images(images_n, seed=2)
    images = tuple(t.to(device) for t in images)
    captions, lengths = (t.to(device) for t in cap.make_captions(images_n, cap.CAPTIONS_PER_IMAGE, seed=3))
    base = dict(kind="training", images=images_n, captions_per_image=cap.CAPTIONS_PER_IMAGE, device=device.type,
                **{k: size[k] for k in ("layers", "d_model", "heads", "d_ff")})
    if rec.time_left():
        model.eval()
        try:
            with _tf32(device, False):
                rec.add(dict(base, what="equal-work gradient check (float32, TF32 off)",
                             **_gradient_agreement(cap, model, images, captions, lengths)))
        except Exception as exc:                                       # recorded, not fatal
            rec.add(dict(base, what="equal-work gradient check", error=f"{type(exc).__name__}: {str(exc)[:300]}"))
        model.train()
    for precision in ("float32, TF32 off", "float32, TF32 on", "bf16 autocast"):
        if precision == "float32, TF32 on" and device.type != "cuda":
            continue                                                   # TF32 is a GPU matter
        for variant in ("geocap", "ort_style"):
            if not rec.time_left():
                return
            record = dict(base, variant=variant, precision=precision)
            try:
                params = [p for p in model.parameters() if p.requires_grad]
                optimizer = make_optimizer(params, "adamw", lr=1e-4)
                _, step = cap.train_steps(model, images, captions, lengths, optimizer, params)[variant]
                autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16 autocast")
                with _tf32(device, precision == "float32, TF32 on"), autocast:
                    for _ in range(2):
                        step()
                    if device.type == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    times = []
                    for _ in range(steps):
                        _sync(device)
                        t0 = time.perf_counter()
                        step()
                        _sync(device)
                        times.append((time.perf_counter() - t0) * 1e3)
                record["step_ms"] = statistics.median(times)
                record["step_ms_min"] = min(times)
                if device.type == "cuda":
                    record["peak_memory_MiB"] = torch.cuda.max_memory_allocated() / 2**20
            except Exception as exc:                                   # recorded, not fatal
                record["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            rec.add(record)


class _tf32:
    """Sets the TF32 flags of matmul and cuDNN for a block (stated, never inherited); restores them."""

    def __init__(self, device: torch.device, enabled: bool):
        self.cuda, self.enabled = device.type == "cuda", enabled

    def __enter__(self):
        if self.cuda:
            self.saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = self.enabled
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = self.saved
        return False


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="JSON file (rewritten after every measurement)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, every code path")
    parser.add_argument("--deadline-s", type=float, default=240.0, help="start no measurement after this")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")           # before triton is imported
        device = torch.device("cpu")
    elif not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run on a CPU machine", file=sys.stderr)
        return 2
    else:
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = False            # stated, not inherited
        torch.backends.cudnn.allow_tf32 = False
    rec = Recorder(args.out, args.deadline_s)
    rec.add(dict(kind="environment", torch=torch.__version__, device=device.type,
                 device_name=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                 loadavg_1m=os.getloadavg()[0], dry_run=args.dry_run))
    attention_records(rec, device, args.dry_run)
    entropy_records(rec, device, args.dry_run)
    training_records(rec, device, args.dry_run)
    errors = [r for r in rec.records if "error" in r]
    print(f"{len(rec.records)} records, {len(errors)} with errors -> {args.out}", flush=True)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())

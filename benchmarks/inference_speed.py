"""How fast compressed models run: prefill latency and decode throughput (transformers ``generate``, KV cache) of a
dense Llama and its LayerChop'd and structurally pruned versions, random init, bf16, on one GPU.

    python benchmarks/inference_speed.py [--models 1.1b 7b] [--reps 3] [--kernels liger] [--breakdown]

Rows per model: dense; LayerChop removing 25% and 50% of the layers (``output`` strategy); structured width pruning
of 20% and 30% of the decoder linears, per-layer widths (the one-threshold choice, by magnitude: on random weights
any criterion gives such shapes; MLP widths multiples of 64) and uniform widths (``--variants`` also offers 30% with
widths multiples of 128 and 256), and 30% with attention groups removed too (Minitron's activation pruning, the
same share of each kind: width pruning that also shrinks attention, as LLM Surgeon may on real weights). Each row's
prefill FLOPs per token (``prefill_flops``) give the speed-up in proportion to the compute removed, beside the
measured one. Prefill, batch 1 and 16 x 2,048 tokens, two ways: as ``generate`` runs it (``generate_prefill_*``: the
KV cache written, the logits of the last position alone, ``logits_to_keep=1``), and as a scoring or training
forward does (``prefill_*``: no cache, every position's logits). Decode: 256 new tokens after a 128-token prompt,
greedy, ``min_new_tokens`` = 256 (batch 1 and 32), tokens/s over the batch. ``--gpu_time`` adds, after the timed
calls, the GPU's busy time (the profiler's kernels) of one generate prefill (``*_gpu_ms``) and of one whole
generation per new token (``decode_*_gpu_step_ms``): where it is well under the wall time, the host's launching of
the kernels is what the wall time measures, not the model's work. Off by default: the profiler can leave CUPTI
attached and the host's kernel launches slower for the rest of the process (pytorch/pytorch#144455), which
host-bound wall times (batch 1, decode) of later rows would carry. Medians of ``--reps`` after a warm-up;
speed-ups against the dense row of the same run. ``--kernels liger`` runs every model with chop's fused kernels
(``model.kernels``: RMSNorm, rotary, SwiGLU). ``--breakdown`` adds, per row, where a batch-16 prefill spends its
time by kind of module (CUDA events around each module, in a forward of its own; "other" is the forward's time
outside them: embeddings, residual adds, masks). Prints a table, writes inference_speed_<models>[_liger].json ($OUT,
else benchmarks/results/) with its provenance.
"""

import argparse
import json
import statistics

import torch

from chop.models.kernels import apply_kernels
from chop.models.loading import load_model
from chop.provenance import provenance
from chop.pruning.layerchop import LayerChop, chop, num_params
from chop.pruning.registry import pruner_from
import gpu_clock
from common import result_path

SHAPES = {
    "1.1b": dict(model_type="llama", hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
                 num_attention_heads=32, num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096),
    "tiny": dict(model_type="llama", hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=4096),  # a smoke test on a CPU
    "7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
               num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
}
VARIANTS = {
    "dense": None,
    "LayerChop 25%": {"chop": {"strategy": "output", "fraction": 0.25}},
    "LayerChop 50%": {"chop": {"strategy": "output", "fraction": 0.5}},
    "structured 20%": {"pruning": {"method": "magnitude", "sparsity": 0.2, "align": 64}},
    "structured 30%": {"pruning": {"method": "magnitude", "sparsity": 0.3, "align": 64}},
    "structured 30%, uniform": {"pruning": {"method": "magnitude", "sparsity": 0.3, "align": 64, "uniform": True}},
    "structured 30%, align 128": {"pruning": {"method": "magnitude", "sparsity": 0.3, "align": 128}},
    "structured 30%, align 256": {"pruning": {"method": "magnitude", "sparsity": 0.3, "align": 256}},
    # Magnitude on random weights removes MLP units alone; this removes the same share of attention groups (rounded:
    # 1 of the 1.1B's 4, 10 of the 7B's 32) and of MLP units, ranked on random tokens (only the shapes matter here).
    "structured 30%, attention too": {"pruning": {"method": "activation", "sparsity": 0.3, "align": 64,
                                                  "units": ["mlp", "attention"], "calibration_samples": 4,
                                                  "seq_len": 256}},
}
DEFAULT_VARIANTS = [v for v in VARIANTS if "align" not in v]


def prefill_flops(model, seq: int = 2048, all_logits: bool = True) -> float:
    """Forward FLOPs per token of a ``seq``-token prefill: 2 x the weights of every linear (the LM head's for every
    position with ``all_logits``, else for the last one alone, as ``generate`` forms them) and causal attention
    (scores and values: each query against (seq+1)/2 keys on average, over the layer's query width), each layer by
    its own shapes."""
    head = model.get_output_embeddings().weight.numel()
    linears = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)) - head
    attention = sum(2 * layer.self_attn.q_proj.out_features * (seq + 1) for layer in model.model.layers)
    return 2 * linears + 2 * head * (1 if all_logits else 1 / seq) + attention


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int, times: list | None = None) -> float:
    """The median seconds of ``reps`` calls of ``fn`` after a warm-up; each call's seconds appended to ``times``."""
    fn()  # warm-up
    times = [] if times is None else times
    times.extend(gpu_clock.timed(fn)[1] for _ in range(reps))
    return statistics.median(times)


def kernel_ms(fn) -> dict[str, float]:
    """GPU milliseconds per kernel (and copy) name during one ``fn()``, from the profiler's CUDA events; none off a
    GPU."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    if DEVICE != "cuda":
        return {}
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync()
    out: dict[str, float] = {}
    for e in prof.events():
        if e.device_type == DeviceType.CUDA:
            out[e.name] = out.get(e.name, 0.0) + e.time_range.elapsed_us() / 1e3
    return out


def gpu_ms(fn) -> float:
    """Milliseconds the GPU spends in kernels and copies during one ``fn()`` (``kernel_ms`` summed; NaN off a GPU):
    set beside the wall time, what of a call is the GPU's work and what is the host's launching of it."""
    return sum(kernel_ms(fn).values()) if DEVICE == "cuda" else float("nan")


@torch.no_grad()
def measure(model, reps: int, decode: bool = True, gpu_time: bool = False) -> dict:
    vocab = model.config.vocab_size
    out = {}
    for batch in (1, 16):
        ids = torch.randint(0, vocab, (batch, 2048), device=DEVICE)
        # generate's first forward: the prompt's KV cache written, the next token's logits alone
        def prefill():
            return model(input_ids=ids, use_cache=True, logits_to_keep=1)

        runs: list[float] = []
        out[f"generate_prefill_b{batch}_ms"] = 1e3 * timed(prefill, reps, runs)
        out[f"generate_prefill_b{batch}_ms_runs"] = [1e3 * t for t in runs]
        if gpu_time:
            out[f"generate_prefill_b{batch}_gpu_ms"] = gpu_ms(prefill)
        out[f"prefill_b{batch}_ms"] = 1e3 * timed(lambda: model(input_ids=ids, use_cache=False), reps)
    for batch in (1, 32) if decode else ():
        prompt = torch.randint(0, vocab, (batch, 128), device=DEVICE)

        def generate():
            return model.generate(prompt, max_new_tokens=256, min_new_tokens=256, do_sample=False, pad_token_id=0)

        s = timed(generate, reps)
        out[f"decode_b{batch}_tok_s"] = batch * 256 / s
        # the GPU's work per new token (the prompt's prefill included, 1/256 of it): what the host's pace hides
        if gpu_time:
            out[f"decode_b{batch}_gpu_step_ms"] = gpu_ms(generate) / 256
    return out


def kind_of(name: str) -> str | None:
    """The group a module's time is counted in (None: not timed on its own)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("q_proj", "k_proj", "v_proj", "o_proj"):
        return "attention linears"
    if leaf == "self_attn":
        return "attention"
    if leaf in ("gate_proj", "up_proj", "down_proj"):
        return "MLP linears"
    if leaf == "mlp":
        return "MLP"
    if leaf.endswith("norm"):
        return "norms"
    if leaf == "lm_head":
        return "LM head"
    return None


@torch.no_grad()
def breakdown(model, batch: int = 16, reps: int = 3) -> dict:
    """Milliseconds of a ``batch`` x 2,048-token prefill per kind of module (medians of ``reps``); ``attention`` and
    ``MLP`` are what their modules spend outside their linears (rotary, SDPA; SiLU and product)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 2048), device=DEVICE)
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    started: dict[str, torch.cuda.Event] = {}  # modules of one kind do not nest: one open at a time

    def pre(kind: str) -> None:
        started[kind] = torch.cuda.Event(enable_timing=True)
        started[kind].record()

    def post(kind: str) -> None:
        end = torch.cuda.Event(enable_timing=True)
        end.record()
        events.append((kind, started.pop(kind), end))

    handles = []
    for name, module in model.named_modules():
        kind = kind_of(name)
        if kind is not None:
            handles.append(module.register_forward_pre_hook(lambda _m, _a, kind=kind: pre(kind)))
            handles.append(module.register_forward_hook(lambda _m, _a, _o, kind=kind: post(kind)))
    runs = []
    for _ in range(reps + 1):  # the first is a warm-up
        events.clear()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        model(input_ids=ids, use_cache=False)
        end.record()
        torch.cuda.synchronize()
        times: dict[str, float] = {}
        for kind, s, e in events:
            times[kind] = times.get(kind, 0.0) + s.elapsed_time(e)
        times["attention"] = times.get("attention", 0.0) - times.get("attention linears", 0.0)
        times["MLP"] = times.get("MLP", 0.0) - times.get("MLP linears", 0.0)
        times["total"] = start.elapsed_time(end)
        times["other"] = times["total"] - sum(v for k, v in times.items() if k != "total")
        runs.append(times)
    for h in handles:
        h.remove()
    return {k: statistics.median(r[k] for r in runs[1:]) for k in runs[1]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="+", default=["1.1b", "7b"], choices=list(SHAPES))
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--kernels", default="torch", choices=["torch", "liger"])
    p.add_argument("--breakdown", action="store_true")
    p.add_argument("--no_decode", action="store_true", help="prefill only")
    p.add_argument("--gpu_time", action="store_true",
                   help="also the GPU's busy time (the profiler); host-bound wall times measured after it may be slower")
    a = p.parse_args()
    results = {"provenance": provenance(None, {"tokens": "random ids"}), "settings": vars(a), "runs": []}
    tag = "_".join(a.models) + ("_liger" if a.kernels == "liger" else "")
    out = result_path(f"inference_speed_{tag}.json")
    print(f"{'model':<6}{'variant':<31}{'params':>8}{'prefill b1':>11}{'(GPU)':>8}{'b16':>9}{'(GPU)':>8}"
          f"{'all logits b16':>15}{'decode b1':>11}{'b32':>9}  (ms; tok/s)")
    for shape in a.models:
        dense = None
        for name in sorted(a.variants, key=lambda n: n != "dense"):
            model = load_model(config=SHAPES[shape], dtype="bfloat16", attn_implementation="sdpa",
                               init_device=DEVICE).eval()  # drawn where it runs: minutes on the CPU at 7B
            todo = VARIANTS[name] or {}
            if "chop" in todo:
                chop(model, LayerChop(**todo["chop"]))
            if "pruning" in todo:
                pruner = pruner_from(todo["pruning"])
                batches = [torch.randint(0, model.config.vocab_size, (1, pruner.seq_len or 256), device=DEVICE)
                           for _ in range(pruner.calibration_samples)]
                pruner.prune(model, batches)
            apply_kernels(model, a.kernels)
            run = {"model": shape, "variant": name, "params": num_params(model),
                   "generate_prefill_flops_per_token": prefill_flops(model, all_logits=False),
                   "prefill_flops_per_token": prefill_flops(model),
                   **measure(model, a.reps, not a.no_decode, a.gpu_time)}
            if a.breakdown:
                run["breakdown_prefill_b16"] = breakdown(model, 16, a.reps)
                print("      " + ", ".join(f"{k} {v:.1f}" for k, v in run["breakdown_prefill_b16"].items()))
            dense = dense or run  # the dense row runs first (when asked for): the ratios are against it
            run.update({f"{k}_speedup": (dense[k] / run[k] if k.endswith("_ms") else run[k] / dense[k])
                        for k in run if k.endswith(("_ms", "_tok_s"))})
            # In proportion to the compute removed: the dense row's prefill FLOPs over this row's.
            run["generate_flops_ratio"] = (dense["generate_prefill_flops_per_token"]
                                           / run["generate_prefill_flops_per_token"])
            run["flops_ratio"] = dense["prefill_flops_per_token"] / run["prefill_flops_per_token"]
            results["runs"].append(run)
            decode = (f"{run['decode_b1_tok_s']:>11.1f}{run['decode_b32_tok_s']:>9.1f}" if not a.no_decode
                      else f"{'-':>11}{'-':>9}")
            decode += (f"   speed-up prefill b16 {run['generate_prefill_b16_ms_speedup']:.2f}x (FLOPs "
                       f"{run['generate_flops_ratio']:.2f}x), all logits {run['prefill_b16_ms_speedup']:.2f}x "
                       f"({run['flops_ratio']:.2f}x)")
            nan = float("nan")  # the GPU's time: only with --gpu_time
            if not a.no_decode:
                decode += (f", decode b1 {run['decode_b1_tok_s_speedup']:.2f}x "
                           f"(GPU {run.get('decode_b1_gpu_step_ms_speedup', nan):.2f}x), b32 "
                           f"{run['decode_b32_tok_s_speedup']:.2f}x (GPU {run.get('decode_b32_gpu_step_ms_speedup', nan):.2f}x)")
            print(f"{shape:<6}{name:<31}{run['params'] / 1e9:>7.2f}B{run['generate_prefill_b1_ms']:>11.1f}"
                  f"{run.get('generate_prefill_b1_gpu_ms', nan):>8.1f}{run['generate_prefill_b16_ms']:>9.1f}"
                  f"{run.get('generate_prefill_b16_gpu_ms', nan):>8.1f}{run['prefill_b16_ms']:>15.1f}" + decode, flush=True)
            out.write_text(json.dumps(results, indent=2))
            del model
            torch.cuda.empty_cache() if DEVICE == "cuda" else None


if __name__ == "__main__":
    main()

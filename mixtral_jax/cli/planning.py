"""The planning verbs, nothing trained: `params`, `cost` and `compile` (memory, FLOPs, dollars)."""

from __future__ import annotations

import argparse
import json
import math
import os
import re

from mixtral_jax.cli.common import add_config_arguments
from mixtral_jax.config import ConfigError, did_you_mean, load_config
from mixtral_jax.hardware import ACCELERATORS, HARDWARE_CHOICES


def cmd_params(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.models.params import param_counts

    counts = param_counts(cfg.model)
    plan = None
    if args.mesh is not None or args.device is not None:
        from mixtral_jax.training.memory import format_plan, parse_mesh, plan_memory, usable_bytes

        if args.device is not None:
            usable_bytes(args.device)  # an unknown device name fails before any work
        plan = plan_memory(cfg, parse_mesh(args.mesh or ""))
    if args.json:
        memory = {"memory": {**plan.as_dict(), **({"device": args.device, "fits": plan.fits(args.device)}
                                                   if args.device else {})}} if plan else {}
        print(json.dumps({**counts, **memory}))
        return 0
    width = max(len(k) for k in counts)
    for name, value in counts.items():
        if name not in ("total", "active"):
            print(f"{name:<{width}}  {value:>18,}")
    print("-" * (width + 20))
    print(f"{'total':<{width}}  {counts['total']:>18,}")
    print(f"{'active':<{width}}  {counts['active']:>18,}  (per token)")
    if plan:
        print()
        print(format_plan(plan, args.device))
    return 0

def cmd_cost(args: argparse.Namespace) -> int:
    from mixtral_jax.training import cost

    cfg = load_config(args.config, args.overrides)
    # Every flag is checked before any work (hardware detection, a CPU peak measurement).
    if (args.tokens is None) == (args.device_hours is None):
        raise ConfigError("give exactly one of --tokens (forward: what they cost) or --device-hours (reverse)")
    for flag, value, options in (("--tokens", args.tokens, {}), ("--device-hours", args.device_hours, {}),
                                 ("--peak-tflops", args.peak_tflops, {}), ("--mfu", args.mfu, {"at_most": 1.0}),
                                 ("--price", args.price, {"allow_zero": True}), ("--seq-len", args.seq_len, {}),
                                 ("--devices", args.devices, {"at_most": cost.MAX_DEVICES})):
        if value is not None:
            cost.check_number(flag, value, **options)
    hardware = args.hardware or cfg.cost.hardware
    override = args.peak_tflops if args.peak_tflops is not None else cfg.cost.peak_tflops
    if hardware not in HARDWARE_CHOICES and override is None:  # with a peak given it is a label
        raise ConfigError(f"--hardware '{hardware}' is not one of {', '.join(HARDWARE_CHOICES)}"
                          f"{did_you_mean(hardware, HARDWARE_CHOICES)}")
    if hardware == "auto":
        hardware = cost.detect_hardware()
    peak, source = cost.peak_tflops(hardware, override, cfg.model.dtype)
    price = cfg.cost.price_per_device_hour if args.price is None else args.price
    seq_len = min(args.seq_len, cfg.model.max_seq_len)
    if args.tokens is not None:
        plan = cost.plan_tokens(cfg.model, seq_len, args.tokens, peak, args.mfu, price, args.devices)
    else:
        plan = cost.plan_hours(cfg.model, seq_len, args.device_hours, peak, args.mfu, price, args.devices)
    figures = {"config": str(args.config), "hardware": hardware, "peak_source": source, "seq_len": seq_len,
               **plan.as_dict()}
    if args.json:
        print(json.dumps(figures))
        return 0
    rows = [
        ("hardware", f"{hardware} ({peak:g} TFLOP/s per device, {source})"),
        ("sequence length", f"{seq_len}"),
        ("training FLOPs / token", f"{plan.train_flops_per_token:.4g}"),
        ("inference FLOPs / token", f"{plan.inference_flops_per_token:.4g}"),
        ("tokens", f"{plan.tokens:.4g}"),
        ("total training FLOPs", f"{plan.total_flops:.4g}"),
        ("assumed MFU", f"{plan.mfu:.0%}"),
        ("device-hours", f"{plan.device_hours:,.0f}"),
        (f"days on {plan.devices} devices", f"{plan.days:,.1f}"),
        ("price per device-hour", f"${plan.price_per_device_hour:,.2f}"),
        ("cost", f"${plan.cost_usd:,.0f}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0

def _request_host_devices(needed: int) -> None:
    """Ask XLA for `needed` host CPU devices: effective only if JAX's backend has not started yet
    (the `compile` verb calls it first thing; otherwise the device check reports the shortfall).
    The environment is restored once the backend is up, so child processes never inherit it."""
    before = {k: os.environ.get(k) for k in ("XLA_FLAGS", "JAX_PLATFORMS")}
    flags = os.environ.get("XLA_FLAGS", "")
    match = re.search(r"--xla_force_host_platform_device_count=(\d+)", flags)
    if match and int(match.group(1)) >= needed:
        return
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={needed}".strip()
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    jax.devices()  # starts the backend with these settings (a no-op if it already runs)
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value

def cmd_compile(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    from mixtral_jax.training.memory import parse_mesh, usable_bytes

    sizes = parse_mesh(args.mesh)
    if args.device is not None:
        usable_bytes(args.device)  # an unknown device name fails before the compile
    _request_host_devices(math.prod(sizes.values()))  # before JAX starts its backend
    from mixtral_jax.training.aot import compile_report, format_compile_report

    report = compile_report(cfg, sizes)
    if args.device:
        report["device"] = args.device
        report["fits"] = report["xla"]["total"] <= usable_bytes(args.device)
    print(json.dumps(report, indent=2) if args.json else format_compile_report(report, args.device))
    return 0


def register(verbs: argparse._SubParsersAction) -> None:
    params = verbs.add_parser("params", help="parameter counts per component and, with --mesh, memory per device; "
                                             "nothing allocated")
    add_config_arguments(params, "YAML file or preset name (e.g. mixtral_8x7b)")
    params.add_argument("--mesh", help="also estimate memory per device on this mesh, e.g. fsdp=8,expert=8 "
                                       "(axes data, fsdp, expert, tensor; unnamed axes 1)")
    params.add_argument("--device", help=f"say whether the estimate fits one of: {', '.join(ACCELERATORS)}")
    params.add_argument("--json", action="store_true", help="print one JSON object (keys include total, active "
                                                            "and, with --mesh, memory)")
    params.set_defaults(func=cmd_params)

    comp = verbs.add_parser(
        "compile", help="compile the real train step for a mesh on host CPU devices and report XLA's memory per "
                        "device (nothing is allocated)",
        description="Ahead-of-time lowering + compiling of the training step exactly as `train` runs it, from "
                    "abstract shapes, over MESH host devices: check that a config fits before renting the pod.")
    add_config_arguments(comp, "YAML file or preset name (e.g. pretrain/mixtral_8x7b)")
    comp.add_argument("--mesh", required=True, help="target mesh, e.g. fsdp=4,expert=2 (axes data, fsdp, expert, "
                                                    "tensor; unnamed axes 1)")
    comp.add_argument("--device", help=f"say whether it fits one of: {', '.join(ACCELERATORS)}")
    comp.add_argument("--json", action="store_true", help="print one JSON object (bytes)")
    comp.set_defaults(func=cmd_compile)

    plan = verbs.add_parser(
        "cost", help="FLOPs per token, device-hours and dollars for a token budget, or the tokens some hours buy",
        description="Plan a run: --tokens N gives FLOPs, device-hours, days and dollars; --device-hours H gives "
                    "the tokens those hours buy. Model FLOPs per token follow PaLM appendix B.")
    add_config_arguments(plan, "YAML file or preset name (e.g. mistral_7b)")
    plan.add_argument("--tokens", type=float, help="training tokens (e.g. 2e12)")
    plan.add_argument("--device-hours", type=float, help="device-hours to spend (reverse mode)")
    plan.add_argument("--hardware", help=f"one of {', '.join(HARDWARE_CHOICES)} "
                                         "(default: the config's cost.hardware)")
    plan.add_argument("--peak-tflops", type=float, help="override the per-device peak")
    plan.add_argument("--mfu", type=float, default=0.4, help="assumed model FLOPs utilisation (default 0.4)")
    plan.add_argument("--price", type=float, help="dollars per device-hour (default: cost.price_per_device_hour)")
    plan.add_argument("--devices", type=int, default=1, help="devices, for the days figure (default 1)")
    plan.add_argument("--seq-len", type=int, default=4096, help="training sequence length (default 4096, capped "
                                                                "at model.max_seq_len)")
    plan.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    plan.set_defaults(func=cmd_cost)

"""``jaxedit plan``: the memory each computation needs per device, for a model shape on a device kind and a mesh
(:func:`jaxedit.plan`, in jaxedit/planning.py), without loading any weights."""
from __future__ import annotations

import json

import click

from jaxedit import planning as planner
from jaxedit.cli.app import DRY_RUN, DRY_RUN_END, cli, echo
from jaxedit.errors import JaxeditError


@cli.command("plan")
@click.option("--model", "model_name", default="gpt2-xl", show_default=True,
              help="a named shape (gpt2-xl, llama-3.2-1b, llama-2-7b, llama-3-8b, llama-2-13b, llama-3-70b), a "
                   "checkpoint folder, a config.json or a .gguf file")
@click.option("--device", default=None, help="device kind: h100-80g, h200-141g, a100-40g, cpu-24g [h100-80g]")
@click.option("--device-memory", default=None, help="memory per device instead of a kind, e.g. 48GiB or 20e9")
@click.option("--mesh", "mesh_spec", default=None, help="data=D,model=M (an axis left out is 1) [one device]")
@click.option("--dtype", default="float32", type=click.Choice(["float32", "bfloat16"]), show_default=True)
@click.option("--headroom", default=0.9, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="fraction of the device memory a plan may fill")
@click.option("--no-refuse", is_flag=True, help="print the table even when the plan does not fit (exit 0)")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON")
@DRY_RUN
def plan(model_name, device, device_memory, mesh_spec, dtype, headroom, no_refuse, as_json, dry_run=False):
    """Per-device bytes of the compiled programs (tracing, saliency, key statistics, the edit's z step, solve and
    update, AlphaEdit's projected solve) from XLA's memory analysis, the host memory of AlphaEdit's float64
    eigendecomposition, the batch sizes that fit, and whether the plan fits
    (refused, naming the smallest mesh that does, when it does not)."""
    if device and device_memory:
        raise JaxeditError("give --device or --device-memory, not both")
    memory = device_memory or device or "h100-80g"
    if device and device.strip().lower() not in planner.DEVICES:
        raise JaxeditError(f"unknown device kind {device!r} (kinds: {', '.join(planner.DEVICES)}; or "
                           f"--device-memory BYTES)")
    name, cfg = planner.resolve_config(model_name)
    dev_name, dev_bytes = planner.device_bytes(memory)
    sizes = planner.mesh_sizes(mesh_spec)
    planner.check_mesh(cfg, sizes)
    if dry_run:
        n = sizes["data"] * sizes["model"]
        echo("\n".join([f"plan: {name} ({cfg.family}, {cfg.n_layers} layers, d_model {cfg.d_model}) in {dtype} on "
                        f"{dev_name} x {planner.mesh_name(sizes)} ({n} device{'s' * (n > 1)}): compile the "
                        f"programs with abstract shapes and print their bytes per device", DRY_RUN_END]))
        return
    report = planner.plan(model_name, device_memory=memory, mesh=mesh_spec,
                          dtype=dtype, headroom=headroom, refuse=not no_refuse)
    echo(json.dumps(report, indent=1) if as_json else planner.format_plan(report))

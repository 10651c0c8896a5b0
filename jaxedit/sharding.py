"""Running on a device mesh: two named axes, ``data`` (prompts, corpus batches, examples, requests, samples) and
``model`` (tensor parallelism, Megatron style), with JAX's own SPMD partitioner doing the work.

A model carries its mesh in its parameters' shardings: :func:`jaxedit.load` with ``mesh=`` (or
:func:`jaxedit.model.shard_model`) places every parameter with a :class:`jax.sharding.NamedSharding` from
:func:`param_specs`, and every entry point that runs a batched computation asks :func:`mesh_of` for the mesh,
pads its batch to a multiple of the ``data`` axis and places it with :func:`put_batch`. The jitted functions
themselves are the single-device ones: GSPMD propagates the input shardings through them (column-split input
projections give head- / d_ff-split activations, the row-split output projections end in an all-reduce, batch
axes stay on ``data``). This module knows parameter trees, not models (it imports nothing of jaxedit.model).

Parameter layout under ``model`` = m (the leading layer axis of stacked parameters is never split):

* attention q/k/v (and GPT-2's biases of them): columns, i.e. heads, over ``model``; m must divide the key/value
  heads (and so the query heads);
* MLP up/gate/fc (and GPT-2's fc bias): columns (d_ff) over ``model``; m must divide d_ff;
* attention output and MLP down / c_proj: rows over ``model`` (their biases and the norms: replicated);
* token embedding [V, d] and untied LM head [d, V]: over the vocabulary when m divides it, else over d_model;
  GPT-2's position table over d_model (replicated when m does not divide it).

A model axis that does not divide the heads or d_ff is refused with a one-line :class:`JaxeditError` (no padding:
padded heads or d_ff columns would change the shapes every method reports, such as the key statistics).

Several hosts: :func:`initialize` starts ``jax.distributed`` (one process per host); meshes then span every
process's devices, :func:`put_batch` builds global arrays from each process's own rows, :func:`to_host` gathers
results to every process and :func:`is_main_process` says who writes files.
"""
from __future__ import annotations

import math
import os
import re
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxedit.batching import round_up
from jaxedit.errors import JaxeditError
from jaxedit.models.common import params_of

AXES = ("data", "model")


# ---------------------------------------------------------------------------------------------- meshes

def parse_mesh_spec(spec: str) -> dict:
    """"data=4,model=2" -> {"data": 4, "model": 2}; an axis left out is absent from the dict."""
    out: dict = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"([A-Za-z_]+)\s*=\s*(-?\d+)", part)
        if not m:
            raise JaxeditError(f"bad mesh {spec!r}: expected axis=size pairs such as data=4,model=2")
        name, size = m.group(1), int(m.group(2))
        if name not in AXES:
            raise JaxeditError(f"bad mesh {spec!r}: unknown axis {name!r} (axes: data, model)")
        if name in out:
            raise JaxeditError(f"bad mesh {spec!r}: axis {name!r} given twice")
        if size < 1:
            raise JaxeditError(f"bad mesh {spec!r}: axis sizes must be >= 1")
        out[name] = size
    return out


def make_mesh(spec: Optional[str] = None, devices=None) -> Mesh:
    """A :class:`jax.sharding.Mesh` with the axes ``("data", "model")`` over ``devices`` (default: every device of
    every process). ``spec``: "data=4,model=2"; an axis left out takes the remaining devices ("model=2" on 8
    devices is data=4, model=2); None or "" puts every device on ``data``. The sizes must multiply to the number
    of devices. The axes are of the automatic kind: jitted code is partitioned by GSPMD from its inputs."""
    if isinstance(spec, Mesh):
        return spec
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    sizes = parse_mesh_spec(spec or "")
    given = math.prod(sizes.values())
    missing = [a for a in AXES if a not in sizes]
    if len(missing) == 2:
        sizes = {"data": n, "model": 1}
    elif len(missing) == 1:
        if n % given:
            raise JaxeditError(f"mesh {spec!r} needs a multiple of {given} devices, but {n} are visible")
        sizes[missing[0]] = n // given
    shape = tuple(sizes[a] for a in AXES)
    if math.prod(shape) != n:
        raise JaxeditError(f"mesh {spec!r} is data={shape[0]} x model={shape[1]} = {math.prod(shape)} devices, "
                           f"but {n} are visible (the axis sizes must multiply to {n})")
    auto = (jax.sharding.AxisType.Auto,) * 2
    try:
        return jax.make_mesh(shape, AXES, axis_types=auto, devices=devices)
    except Exception:  # device sets jax.make_mesh cannot lay out (e.g. a subset): the given order
        return Mesh(np.array(devices).reshape(shape), AXES, axis_types=auto)


def resolve_mesh(mesh) -> Optional[Mesh]:
    """None, a Mesh, or a spec string (see :func:`make_mesh`)."""
    if mesh is None or isinstance(mesh, Mesh):
        return mesh
    return make_mesh(mesh)


def describe(mesh: Optional[Mesh]) -> str:
    if mesh is None:
        return "one device"
    return f"data={mesh.shape['data']},model={mesh.shape['model']}"


def _first_leaf(obj):
    params = obj if isinstance(obj, dict) else params_of(obj)
    return params["blocks"]["w_out"]


def mesh_of(obj) -> Optional[Mesh]:
    """The mesh a model (or a parameter dict) is placed on, or None for a model on one device."""
    leaf = _first_leaf(obj)
    sharding = getattr(leaf, "sharding", None)
    if isinstance(sharding, NamedSharding) and tuple(sharding.mesh.axis_names) == AXES:
        return sharding.mesh
    return None


def data_size(mesh: Optional[Mesh]) -> int:
    return 1 if mesh is None else int(mesh.shape["data"])


def padded(n: int, mesh: Optional[Mesh]) -> int:
    """``n`` rounded up to a multiple of the data axis."""
    return round_up(n, data_size(mesh))


# ---------------------------------------------------------------------------------------------- parameters

def param_specs(cfg, mesh: Optional[Mesh], params: dict) -> dict:
    """The :class:`PartitionSpec` of every parameter of ``params`` (the model's parameter tree, or its abstract
    shapes from :func:`jaxedit.model.abstract_params`). Raises a one-line error when the model axis does not divide
    the heads or d_ff."""
    tree = params
    m = 1 if mesh is None else int(mesh.shape["model"])
    if m == 1:
        return jax.tree.map(lambda _: P(), tree)
    if cfg.n_kv_heads % m or cfg.n_heads % m or cfg.d_ff % m:
        kv = f", key/value heads {cfg.n_kv_heads}" if cfg.n_kv_heads != cfg.n_heads else ""
        ok = math.gcd(cfg.n_kv_heads, cfg.d_ff)
        raise JaxeditError(f"a model axis of {m} does not divide this model's attention heads ({cfg.n_heads}{kv}) "
                           f"and d_ff ({cfg.d_ff}): use a model axis that divides {ok}, or more of the data axis")
    V, d = cfg.vocab_size, cfg.d_model
    if V % m and d % m:
        raise JaxeditError(f"a model axis of {m} divides neither the vocabulary ({V}) nor d_model ({d})")
    col, row, rep = P(None, None, "model"), P(None, "model", None), P()
    block = {"wq": col, "wk": col, "wv": col, "wo": row, "w_in": col, "w_gate": col, "w_up": col, "w_out": row,
             "bq": P(None, "model"), "bk": P(None, "model"), "bv": P(None, "model"), "b_in": P(None, "model")}
    top = {"wte": P("model", None) if V % m == 0 else P(None, "model"),
           "embed": P("model", None) if V % m == 0 else P(None, "model"),
           "lm_head": P(None, "model") if V % m == 0 else P("model", None),
           "wpe": P(None, "model") if d % m == 0 else rep}
    return {k: ({n: block.get(n, rep) for n in v} if k == "blocks" else top.get(k, rep)) for k, v in tree.items()}


def param_shardings(cfg, mesh: Mesh, params: dict) -> dict:
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg, mesh, params),
                        is_leaf=lambda x: isinstance(x, P))


def shard_params(cfg, params: dict, mesh) -> dict:
    """``params`` placed on ``mesh`` (each device receives only its shards)."""
    mesh = resolve_mesh(mesh)
    if mesh is None:
        return params
    return jax.tree.map(lambda a, s: jax.device_put(a, s), params, param_shardings(cfg, mesh, params))


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024


def bytes_per_device(params) -> dict:
    """{device: bytes of parameter shards it holds}, from the arrays' shardings."""
    out: dict = {}
    for leaf in jax.tree.leaves(params):
        for shard in leaf.addressable_shards:
            out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
    return out


# ---------------------------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    spec = [None] * ndim
    spec[axis] = "data"
    return NamedSharding(mesh, P(*spec))


def local_rows(mesh: Optional[Mesh], n: int, axis_len: Optional[int] = None) -> np.ndarray:
    """Indices of the rows (of a batch of ``n`` split over ``data``) held by this process's devices: the rows this
    process has to prepare. Every row without a mesh or with one process."""
    if mesh is None or jax.process_count() == 1:
        return np.arange(n)
    sharding = batch_sharding(mesh, 1)
    rows = set()
    for idx in sharding.addressable_devices_indices_map((n,)).values():
        rows.update(range(*idx[0].indices(n)))
    return np.array(sorted(rows), np.int64)


def put_batch(mesh: Optional[Mesh], array, axis: int = 0):
    """A host batch as a device array split over ``data`` along ``axis`` (whose length must be a multiple of the
    data axis). With several processes each one supplies only its own rows (the others may hold anything)."""
    array = np.asarray(array)
    if mesh is None:
        return jnp.asarray(array)
    sharding = batch_sharding(mesh, array.ndim, axis)
    return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def put_replicated(mesh: Optional[Mesh], array):
    array = np.asarray(array)
    if mesh is None:
        return jnp.asarray(array)
    return jax.make_array_from_callback(array.shape, NamedSharding(mesh, P()), lambda idx: array[idx])


def to_host(tree):
    """Device arrays -> numpy on every process (gathering shards held by other processes when needed)."""
    def one(x):
        if not isinstance(x, jax.Array):
            return np.asarray(x)
        if x.is_fully_addressable:
            return np.asarray(jax.device_get(x))
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return jax.tree.map(one, tree)


# ---------------------------------------------------------------------------------------------- processes

def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Start ``jax.distributed`` (one process per host) before anything touches a device. Returns True when this
    is a multi-process run.

    ``coordinator``: "host:port" of process 0, with ``num_processes`` and ``process_id`` (or the environment
    variables JAX_NUM_PROCESSES / JAX_PROCESS_ID); "auto": JAX's cluster detection (SLURM, Open MPI, Cloud TPU pod
    slices, Kubernetes); None: start only when JAX_COORDINATOR_ADDRESS is set (then as for "host:port")."""
    from jax._src import distributed as _dist

    if _dist.global_state.client is not None:
        return jax.process_count() > 1
    kw = distributed_args(coordinator, num_processes, process_id)
    if kw is None:
        return False
    try:
        jax.distributed.initialize(**kw)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise JaxeditError(f"could not start jax.distributed ({first})") from None
    return jax.process_count() > 1


def distributed_args(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
                     process_id: Optional[int] = None) -> Optional[dict]:
    """The checked arguments of ``jax.distributed.initialize`` for :func:`initialize`'s options (None: a single
    process); starts nothing, so a dry run checks them too."""
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        if num_processes is not None or process_id is not None:
            raise JaxeditError("--num-processes/--process-id need --coordinator HOST:PORT (or auto)")
        return None

    def env_int(value, name):
        if value is not None:
            return int(value)
        if os.environ.get(name):
            try:
                return int(os.environ[name])
            except ValueError:
                raise JaxeditError(f"{name} must be an integer (got {os.environ[name]!r})") from None
        return None

    kw = {}
    if coordinator != "auto":
        if not re.fullmatch(r"\[?[^\s]+\]?:\d+", coordinator):
            raise JaxeditError(f"bad coordinator {coordinator!r}: expected HOST:PORT or auto")
        kw["coordinator_address"] = coordinator
    n, i = env_int(num_processes, "JAX_NUM_PROCESSES"), env_int(process_id, "JAX_PROCESS_ID")
    if coordinator != "auto" and (n is None or i is None):
        raise JaxeditError("a coordinator address needs the number of processes and this process's id "
                           "(--num-processes N --process-id I, or JAX_NUM_PROCESSES / JAX_PROCESS_ID)")
    if n is not None:
        if n < 1 or i is None or not 0 <= i < n:
            raise JaxeditError(f"process id {i} is not within 0..{n - 1}")
        kw.update(num_processes=n, process_id=i)
    return kw


def is_main_process() -> bool:
    return jax.process_index() == 0


def broadcast_json(obj):
    """Process 0's JSON-serialisable ``obj``, on every process (itself with one process)."""
    if jax.process_count() == 1:
        return obj
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8) if is_main_process() else np.zeros(0, np.uint8)
    n = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
    buf = np.zeros(n, np.uint8)
    buf[:data.size] = data[:n]
    out = np.asarray(multihost_utils.broadcast_one_to_all(buf))
    return json.loads(out.tobytes().decode())


def global_max(value: int) -> int:
    """The largest of every process's ``value``."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.max(multihost_utils.process_allgather(np.int64(value))))


def global_sum(value: int) -> int:
    """The sum of every process's ``value``."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.sum(multihost_utils.process_allgather(np.int64(value))))


def sync(name: str) -> None:
    """Wait until every process gets here (nothing with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)

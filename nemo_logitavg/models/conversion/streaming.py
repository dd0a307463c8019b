"""A live (TP/PP/DP-sharded) model leaves as a stream of Hugging Face-named full tensors.

``iter_hf_buckets`` yields each pipeline stage's tensors in Hugging Face names, full size, in the buckets of
``mapping.hf_bucket_plan`` (a pure function, so a receiver knows the shapes in advance), gathering TP shards
tensor by tensor over the TP group; the push sends it to the rollout servers and ``export_model_hf`` writes a
Hugging Face directory from it, every stage its own files. The tensors come from ``mapping.stage_sources``, the
mapping the offline ``mcore_to_hf_state_dict`` reads too.
"""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from nemo_logitavg.models.builder import LlamaConfig
from nemo_logitavg.models.conversion.hf_files import (
    DEFAULT_MAX_SHARD_BYTES,
    export_config,
    fsync,
    save_weight_file,
    weight_files,
    write_metadata,
)
from nemo_logitavg.models.conversion.loading import model_layers, parallel_ranks, unwrap
from nemo_logitavg.models.conversion.mapping import (
    HFSource,
    check_parallel_layout,
    hf_bucket_plan,
    listing,
    local_names,
    stage_layers,
    stage_sources,
)

EXPORT_BUCKET_BYTES = 256 * 2**20  # what an export streams at a time (device memory beyond the model)

_COLUMN_BLOCKS = 4  # column-split tensors move in this many row blocks: a quarter of a shard in flight, not all
_COLUMN_BLOCK_MAX_BYTES = 64 * 2**20


def _fill_full(
    out: torch.Tensor | None,
    local: torch.Tensor,
    source: HFSource,
    group: dist.ProcessGroup,
    tp_size: int,
    shape: tuple[int, ...],
    dst: int | None = None,
) -> None:
    """Write the full Hugging Face tensor ``source`` describes (``shape``) into ``out`` (its place in the bucket),
    from this rank's shard ``local``: a collective over the TP ``group``.

    ``dst=None``: every rank ends with the same values; each TP rank broadcasts its rows straight into their place
    (gloo's all-gather would stage the whole tensor in a second buffer). ``dst`` a TP rank: only that rank
    assembles the tensor (the others pass ``out=None``), the others send it their parts point to point, half the
    traffic of the broadcasts at TP=2 and 1/TP of it at larger TP. Column-split tensors pass through one buffer of
    a block of rows on the receiving ranks.
    """
    piece = (source.piece(local) if source.piece is not None else local).detach()
    me = dist.get_rank(group)
    mine = dst is None or me == dst  # this rank assembles the tensor

    def move(r: int, part: torch.Tensor) -> None:  # rank r's part, from r to the assembling rank(s), in place
        if dst is None:
            dist.broadcast(part, src=dist.get_global_rank(group, r), group=group)
        elif r != dst and me == r:
            dist.send(part.contiguous(), dst=dist.get_global_rank(group, dst), group=group)
        elif r != dst and me == dst:
            dist.recv(part, src=dist.get_global_rank(group, r), group=group)

    if tp_size == 1 or source.dim is None:
        if mine:
            out.copy_(piece[: shape[0]])  # TP=1: the vocabulary padding rows are dropped by the slice
        if tp_size > 1:  # replicated: TP rank 0's copy, as the offline mapping takes, on every assembling rank
            move(0, out if mine else piece[: shape[0]])
        return
    if source.dim == 0:
        per_rank = piece.shape[0]
        for r in range(tp_size):
            start = r * per_rank
            count = min(per_rank, shape[0] - start)  # the vocabulary's padding rows are not sent
            if count <= 0:
                break
            if r == me and mine:
                out[start : start + count].copy_(piece[:count])
            move(r, out[start : start + count] if mine else piece[:count])
        return
    _fill_columns(out, piece, move, me, mine, tp_size)


def _fill_columns(
    out: torch.Tensor | None,
    piece: torch.Tensor,
    move: Callable[[int, torch.Tensor], None],
    me: int,
    mine: bool,
    tp_size: int,
) -> None:
    """``_fill_full`` for a tensor split on columns (``piece`` is this rank's ``[rows, cols]``): rank r's columns,
    row block by row block; the assembling ranks receive through one block-sized buffer, a sending rank's rows are
    contiguous already."""
    rows, cols = piece.shape
    row_bytes = cols * piece.element_size()
    block = max(1, min(-(-rows // _COLUMN_BLOCKS), _COLUMN_BLOCK_MAX_BYTES // row_bytes))
    staging = piece.new_empty((block, cols)) if mine else None
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        for r in range(tp_size):
            if not mine:
                if r == me:
                    move(r, piece[start:stop])
                continue
            part = staging[: stop - start]
            if r == me:
                part.copy_(piece[start:stop])
            move(r, part)
            out[start:stop, r * cols : (r + 1) * cols].copy_(part)


def _check_piece(name: str, local: torch.Tensor, source: HFSource, shape: tuple[int, ...], tp_size: int) -> None:
    """Raise ValueError when this rank's part cannot make ``shape`` (a model built for another config)."""
    piece = list((source.piece(local) if source.piece is not None else local).shape)
    parts = 1 if source.dim is None else tp_size
    dim = 0 if source.dim is None else source.dim
    whole = [n * parts if d == dim else n for d, n in enumerate(piece)]
    padded = source.rows is not None  # the vocabulary: padding rows beyond the true size
    fits = len(whole) == len(shape) and all(
        (w >= n if padded and d == 0 else w == n) for d, (w, n) in enumerate(zip(whole, shape, strict=True))
    )
    if not fits:
        raise ValueError(f"{name}: this rank's part {tuple(piece)} cannot make the config's shape {shape}")


def iter_hf_buckets(
    model: torch.nn.Module, cfg: LlamaConfig, bucket_bytes: int, dst: int | None = None
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """This pipeline stage's policy weights as Hugging Face-named FULL tensors, bucket by bucket, exactly following
    hf_bucket_plan(cfg, pp_rank, pp_size, bucket_bytes, param dtype). A collective over this rank's tensor-parallel
    group only (every TP rank of the stage calls it in lockstep, any DP replica may); TP shards are all-gathered per
    tensor (vocab padding removed, q/k/v and gate/up split as the mapping does), never the whole model. Every TP
    rank yields identical full tensors, on the model's device (CUDA tensors over NCCL on GPUs, CPU over gloo).
    With ``dst`` (a TP rank: the push's sender, the export's writer) only that rank assembles and yields the
    tensors; the others send it their shards and yield an empty list per bucket, in lockstep. Peak extra memory:
    one bucket plus one tensor in flight (on the other ranks with ``dst``: one contiguous part in flight).

    The tensors are fresh (no views of the parameters): consecutive views of one buffer per bucket, in plan
    order. A consumer that drops each bucket before asking for the next keeps the peak at one bucket. Checked
    before any collective (so every TP rank raises together): the stage's layers are megatron's even split, its
    state dict has exactly the mapping's keys and shapes that make the config's, one dtype.

    Raises:
        ValueError: naming the mismatched layers, keys or dtypes.
    """
    model = unwrap(model)
    tp_rank, tp_size, pp_rank, pp_size = parallel_ranks()
    check_parallel_layout(cfg, tp_size, pp_size)
    layers = stage_layers(cfg.num_hidden_layers, pp_rank, pp_size)
    if model_layers(model) != list(layers):
        raise ValueError(
            f"pipeline stage {pp_rank} holds layers {model_layers(model)}, the even split of "
            f"{cfg.num_hidden_layers} layers over {pp_size} stages is {list(layers)}"
        )
    state = local_names(model.state_dict())
    sources, silent = stage_sources(cfg, layers, pp_rank == 0, pp_rank == pp_size - 1, pp_size)
    expected = {source.mcore for source in sources.values()} | set(silent)
    missing, unexpected = expected - set(state), set(state) - expected
    if missing or unexpected:
        raise ValueError(
            f"stage {pp_rank}'s state dict does not match the {cfg.model_type} mapping: "
            f"missing {listing(missing) or 'none'}; unexpected {listing(unexpected) or 'none'}"
        )
    dtypes = {tensor.dtype for name, tensor in state.items() if name in expected}
    if len(dtypes) != 1:
        raise ValueError(f"stage {pp_rank}'s weights mix dtypes {sorted(map(str, dtypes))}; the plan needs one")
    dtype = dtypes.pop()
    group = ps.get_tensor_model_parallel_group()
    plan = hf_bucket_plan(cfg, pp_rank, pp_size, bucket_bytes, dtype)
    for name, shape in (entry for planned in plan for entry in planned):
        _check_piece(name, state[sources[name].mcore], sources[name], shape, tp_size)
    device = next(iter(state.values())).device
    bucket_numel = bucket_bytes // torch.empty((), dtype=dtype).element_size()
    assembles = dst is None or ps.get_tensor_model_parallel_rank() == dst
    for planned in plan:
        if not assembles:
            for name, shape in planned:
                _fill_full(None, state[sources[name].mcore], sources[name], group, tp_size, tuple(shape), dst)
            yield []
            continue
        # One fresh buffer per bucket, its tensors consecutive views in plan order (a consumer may move the bucket
        # as one tensor); always the bucket's size at least, so the allocator reuses one block for all of them.
        flat = torch.empty(max(sum(math.prod(shape) for _, shape in planned), bucket_numel), dtype=dtype, device=device)
        bucket, offset = [], 0
        for name, shape in planned:
            view = flat[offset : offset + math.prod(shape)].view(shape)
            _fill_full(view, state[sources[name].mcore], sources[name], group, tp_size, tuple(shape), dst)
            bucket.append((name, view))
            offset += view.numel()
        del flat, view
        yield bucket
        del bucket


def export_model_hf(
    model: torch.nn.Module,
    cfg: LlamaConfig,
    out_dir: str | os.PathLike,
    source_dir: str | os.PathLike | None = None,
    *,
    bucket_bytes: int = EXPORT_BUCKET_BYTES,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
) -> None:
    """Write a live (TP/PP/DP-sharded) model as one Hugging Face directory; a collective over the default group.

    Each pipeline stage's writer (TP rank 0 of DP rank 0) streams its stage with ``iter_hf_buckets`` (its TP peers
    in lockstep) and writes that stage's safetensors files (at most ``max_shard_bytes`` each, host memory: one
    file); global rank 0 writes the index, config.json (the source's, dtype updated, else one from ``cfg``) and the
    source's tokenizer / generation files. No rank holds the whole model. The directory appears whole or not at
    all: everything is written into ``OUT_DIR.tmp`` beside it and flushed, then rank 0 renames it into place.

    Raises:
        ValueError: the source config describes another model, the model does not fit ``cfg`` or mixes dtypes
            (on the rank at fault; every other rank raises RuntimeError naming it). OSError likewise. Nothing is
            left at ``out_dir`` or ``OUT_DIR.tmp`` after a failure.
    """
    out_dir = os.path.abspath(os.fspath(out_dir))
    tmp = out_dir + ".tmp"
    rank = dist.get_rank()
    tp_rank, _, pp_rank, pp_size = parallel_ranks()
    streams = ps.get_data_parallel_rank() == 0  # one replica streams; its TP rank 0 of each stage writes
    writer = streams and tp_rank == 0
    state = local_names(unwrap(model).state_dict())
    dtype = next(iter(state.values())).dtype
    config: dict = {}

    def prepare() -> None:
        nonlocal config
        if rank == 0:
            config = export_config(cfg, dtype, source_dir)
            shutil.rmtree(tmp, ignore_errors=True)  # a killed export's leftovers
            os.makedirs(tmp)

    dtypes = _agree(prepare, str(dtype), tmp)
    if len(set(dtypes)) != 1:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"the pipeline stages' weights have different dtypes {sorted(set(dtypes))}")
    files = weight_files(cfg, pp_size, dtype, max_shard_bytes)

    _agree(lambda: _write_stage(model, cfg, pp_rank, files[pp_rank], tmp, bucket_bytes, streams, writer), None, tmp)

    def publish() -> None:
        if rank == 0:
            _publish(tmp, out_dir, cfg, config, files, dtype, source_dir)

    _agree(publish, None, tmp)


def _write_stage(
    model: torch.nn.Module,
    cfg: LlamaConfig,
    pp_rank: int,
    stage_files: list[tuple[str, list[str]]],
    tmp: str,
    bucket_bytes: int,
    streams: bool,
    writer: bool,
) -> None:
    """Stream this stage's tensors (every rank of a streaming replica, in lockstep) and, on the writer, save each
    of ``stage_files`` (a file name and the HF names it holds) into ``tmp`` as soon as its tensors are in."""
    if not streams:
        return
    pending: dict[str, torch.Tensor] = {}
    remaining = iter(stage_files)
    file, names = next(remaining)
    failure: BaseException | None = None
    for bucket in iter_hf_buckets(model, cfg, bucket_bytes, dst=0):  # only the writer assembles tensors
        # After a failure the writer keeps consuming: its TP peers are still gathering with it.
        if writer and failure is None:
            try:
                for name, tensor in bucket:
                    pending[name] = tensor.to("cpu", copy=True)  # its own storage: the bucket's is shared
                    if len(pending) == len(names):
                        save_weight_file({n: pending[n] for n in names}, os.path.join(tmp, file))
                        pending.clear()
                        file, names = next(remaining, (None, []))
            except Exception as exc:  # noqa: BLE001 - re-raised after the stream ends
                failure, pending = exc, {}
        del bucket  # before the next one is gathered: one bucket at a time
    if failure is not None:
        raise failure
    if writer and file is not None:
        raise RuntimeError(f"stage {pp_rank}'s stream ended before {file} was complete")


def _publish(tmp: str, out_dir: str, cfg: LlamaConfig, config: dict, files: list, dtype: torch.dtype,
             source_dir: str | os.PathLike | None) -> None:  # fmt: skip
    """Rank 0: the index and config.json into ``tmp``, flushed, then ``tmp`` renamed into place (the old directory,
    if any, moved aside first and removed after)."""
    write_metadata(tmp, cfg, config, files, dtype, source_dir)
    fsync(tmp)
    old = out_dir + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.lexists(out_dir):
        os.replace(out_dir, old)
    os.replace(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _agree(step: Callable[[], None], value, tmp: str) -> list:
    """Run ``step`` on every rank, then learn every rank's outcome (a collective over the default group).

    Returns every rank's ``value``. When any rank failed, rank 0 removes ``tmp``; the failing rank re-raises its
    own exception and the others raise RuntimeError naming it, so no rank is left waiting in a later collective.
    """
    failure: BaseException | None = None
    try:
        step()
    except Exception as exc:  # noqa: BLE001 - every rank must reach the gather below
        failure = exc
    outcomes: list = [None] * dist.get_world_size()
    mine = (None if failure is None else f"{type(failure).__name__}: {failure}", value)
    dist.all_gather_object(outcomes, mine)
    failed = [(r, message) for r, (message, _) in enumerate(outcomes) if message is not None]
    if failed:
        if dist.get_rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure
        raise RuntimeError("the Hugging Face export failed on " + "; ".join(f"rank {r}: {m}" for r, m in failed))
    return [v for _, v in outcomes]

"""The model-folder format, written once for both backends (SPEC section 5).

A model folder holds `config.json`, the weights as one `model.safetensors` or as shards
`model-00001-of-0000K.safetensors` with `model.safetensors.index.json`, and optionally
`tokenizer.json`. This module knows the canonical tensor names and shapes for a config, reads
safetensors headers without any framework, validates a folder, plans shards and makes every write
atomic. The backends only turn arrays into files and back with their own safetensors support.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from pathlib import Path

from common import validate
from common.config import ModelConfig
from common.validate import DTYPE_SIZES, CheckpointError, read_safetensors  # noqa: F401 (the one header reader)

FORMAT = "lm-sleep"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# config / CLI dtype name -> safetensors tag (the dtypes a model may be stored or run in)
DTYPE_TAGS = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}
# Files a model folder may hold beside config.json and the weights (checked like them when present).
COMPANION_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def check_dtype(name: str | None) -> str | None:
    """A dtype name from the user (None = keep the stored one); anything else is a ValueError naming it."""
    if name is not None and name not in DTYPE_TAGS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPE_TAGS)}, got {name!r}")
    return name


def param_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape for every tensor of a model with this config, in a fixed order."""
    c = config
    d, hd, dk, dv = c.d_model, c.n_heads * c.head_dim, c.ssm_heads * c.ssm_head_dim, c.ssm_heads * c.ssm_v_dim
    shapes = {"embed.weight": (c.vocab_size, d)}
    for i, kind in enumerate(c.layer_types):
        p = f"layers.{i}."
        shapes[p + "norm1.weight"] = (d,)
        if kind == "A":
            kv = c.kv_heads * c.head_dim
            for name, out_dim in (("q_proj", hd), ("k_proj", kv), ("v_proj", kv)):
                shapes[p + f"attn.{name}.weight"] = (out_dim, d)
                if c.attn_bias:
                    shapes[p + f"attn.{name}.bias"] = (out_dim,)
            if c.qk_norm:
                shapes[p + "attn.q_norm.weight"] = shapes[p + "attn.k_norm.weight"] = (c.head_dim,)
            shapes[p + "attn.o_proj.weight"] = (d, hd)
        else:
            for name, out_dim in (("q_proj", dk), ("k_proj", dk), ("v_proj", dv), ("a_proj", c.ssm_heads),
                                  ("b_proj", c.ssm_heads), ("g_proj", dv)):
                shapes[p + f"ssm.{name}.weight"] = (out_dim, d)
            shapes[p + "ssm.o_proj.weight"] = (d, dv)
            if c.conv_size:
                for name, ch in (("q_conv", dk), ("k_conv", dk), ("v_conv", dv)):
                    shapes[p + f"ssm.{name}.weight"] = (ch, c.conv_size)
            shapes[p + "ssm.A_log"] = (c.ssm_heads,)
            shapes[p + "ssm.dt_bias"] = (c.ssm_heads,)
            shapes[p + "ssm.o_norm.weight"] = (c.ssm_v_dim,)
        if not c.has_mlp(kind):
            continue
        shapes[p + "norm2.weight"] = (d,)
        for name, shape in (("gate_proj", (c.mlp_hidden, d)), ("up_proj", (c.mlp_hidden, d)),
                            ("down_proj", (d, c.mlp_hidden))):
            shapes[p + f"mlp.{name}.weight"] = shape
    shapes["norm.weight"] = (d,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, d)
    return shapes


# --- config.json ---------------------------------------------------------------------------------

def config_document(config: ModelConfig, tokenizer: dict | None = None, **extra) -> dict:
    doc = {"format": FORMAT, "format_version": FORMAT_VERSION, "model": config.to_dict()}
    if tokenizer is not None:
        doc["tokenizer"] = tokenizer
    doc.update(extra)
    return doc


CHAT_TEMPLATE_FILE = "chat_template.jinja"  # a pretrained model's chat template, beside config.json


def companion_files(tokenizer=None, chat_template: str | None = None) -> dict[str, str]:
    """{file name: text} a model folder carries beside config.json: a pretrained ("hf") tokenizer's
    tokenizer.json and the chat template. Task tokenizers live inside config.json and need none."""
    files = {}
    if tokenizer is not None and hasattr(tokenizer, "to_json"):
        files[tokenizer.file] = tokenizer.to_json()
    if chat_template:
        files[CHAT_TEMPLATE_FILE] = chat_template
    return files


def read_companions(folder: str | os.PathLike, doc: dict) -> dict[str, str]:
    """The companion files of a model folder (named by its tokenizer block, plus the chat template)."""
    folder = Path(folder)
    names = [CHAT_TEMPLATE_FILE]
    block = doc.get("tokenizer")
    if isinstance(block, dict) and block.get("type") == "hf":
        names.append(block.get("file", "tokenizer.json"))
    return {name: validate.read_text(folder / validate.plain_name(name, str(folder / CONFIG_FILE), "tokenizer.file"),
                                     name, folder)
            for name in names if os.path.lexists(folder / str(name))}


def write_companions(folder: str | os.PathLike, files: dict[str, str]) -> None:
    for name, text in files.items():
        (Path(folder) / name).write_text(text, encoding="utf-8")


def read_chat_template(folder: str | os.PathLike) -> str | None:
    path = Path(folder) / CHAT_TEMPLATE_FILE
    return validate.read_text(path, "chat template", folder) if os.path.lexists(path) else None


def read_json_file(path: Path, missing: str):
    """The parsed JSON at `path` (a bounded regular file: common.validate.read_json);
    CheckpointError "PATH: missing (<missing>)" or "PATH: not valid JSON"."""
    return validate.read_json(path, missing)


def read_config(folder: str | os.PathLike) -> tuple[ModelConfig, dict]:
    """Read and validate a folder's config.json -> (ModelConfig, the whole document)."""
    path = Path(folder) / CONFIG_FILE
    recover_folder(folder)  # a replacement killed half-way leaves the folder under another name
    if not Path(folder).is_dir():
        raise CheckpointError(f"{folder}: not a model folder (no such directory)")
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing (not an lm-sleep model folder)")
    doc = validate.read_json(path, "config.json of the model folder", folder)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        shown = validate.shown(doc.get("format") if isinstance(doc, dict) else None)
        raise CheckpointError(f"{path}: format is {shown}, expected {FORMAT!r}")
    if doc.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: format_version {validate.shown(doc.get('format_version'))} is not "
                              f"supported (this lm-sleep reads version {FORMAT_VERSION})")
    try:
        config = ModelConfig.from_dict(doc.get("model"))
    except ValueError as e:
        raise CheckpointError(f"{path}: bad model config: {e}") from None
    if doc.get("quantization") is not None:
        validate.check_quantization(doc["quantization"], path)
    validate.check_tokenizer_block(doc.get("tokenizer"), config.vocab_size, folder, path)
    return config, doc


# --- safetensors headers (no framework needed: common.validate.read_safetensors) -----------------

def read_header(path: str | os.PathLike) -> dict[str, tuple[str, tuple[int, ...]]]:
    """name -> (dtype tag, shape) from a safetensors file; checks the file is long enough."""
    header, _, _ = read_safetensors(path)
    return {name: (info["dtype"], info["shape"]) for name, info in header.items()}


def read_metadata(path: str | os.PathLike) -> dict:
    """The `__metadata__` strings of a safetensors file (checked like read_header)."""
    return read_safetensors(path)[1]


def weight_files(folder: str | os.PathLike) -> list[Path]:
    """The safetensors files of a model folder (one file, or the shards its index names)."""
    return sorted(set(_weight_map(folder)[1].values()))


def _weight_map(folder) -> tuple[dict[str, str] | None, dict[str, Path]]:
    """(the index's weight_map or None, file name -> path) of a folder's weights, every file checked to
    be a regular file inside the folder before anything opens it."""
    folder = Path(folder)
    index = folder / INDEX_FILE
    if os.path.lexists(index):
        weight_map = validate.check_index(validate.read_json(index, "shard index", folder), folder, index)
        return weight_map, {n: folder / n for n in set(weight_map.values())}
    path = folder / WEIGHTS_FILE
    if not os.path.lexists(path):
        raise CheckpointError(f"{path}: missing weights file")
    validate.regular_file(path, folder, "weights file")
    return None, {WEIGHTS_FILE: path}


def expected_shapes(config: ModelConfig, quantization: dict | None = None) -> dict[str, tuple[int, ...]]:
    """Names and shapes a folder must hold; quantized folders pack weights and add scales/biases."""
    shapes = param_shapes(config)
    if not quantization:
        return shapes
    bits, group, layers = validate.check_quantization(quantization, CONFIG_FILE)
    quantized = set(layers)
    linear = {n[: -len(".weight")] for n in shapes if n.startswith("layers.") and n.endswith("_proj.weight")}
    unknown = sorted(quantized - linear)  # block projections only: never embeddings, the head, norms or convs
    if unknown:
        raise CheckpointError(f"config.json: quantization lists unknown layer {validate.shown_name(unknown[0])}")
    out = {}
    for name, shape in shapes.items():
        base = name[: -len(".weight")] if name.endswith(".weight") else None
        if base in quantized:
            rows, cols = shape
            if (cols * bits) % 32 or cols % group:
                raise CheckpointError(f"config.json: layer {base} (in={cols}) cannot be quantized with "
                                      f"bits={bits}, group_size={group}")
            out[name] = (rows, cols * bits // 32)
            out[base + ".scales"] = (rows, cols // group)
            out[base + ".biases"] = (rows, cols // group)
        else:
            out[name] = shape
    return out


def validate_folder(folder: str | os.PathLike, check_values: bool = True
                    ) -> tuple[ModelConfig, dict, dict[str, Path]]:
    """Check config.json, every file and every tensor header (and, with check_values, that every float
    is finite) -> (config, document, name -> file holding it)."""
    return check_folder(folder, check_values)[:3]


def check_folder(folder: str | os.PathLike, check_values: bool = True
                 ) -> tuple[ModelConfig, dict, dict[str, Path], str]:
    """validate_folder plus the folder's float dtype tag (F32 / BF16 / F16)."""
    config, doc = read_config(folder)
    validate.check_companions(folder, COMPANION_FILES)
    quant = doc.get("quantization")
    expected = expected_shapes(config, quant)
    weight_map, files = _weight_map(folder)
    where: dict[str, Path] = {}
    found: dict[str, tuple[str, tuple[int, ...]]] = {}
    headers = {}
    for fname, f in sorted(files.items()):
        entries, _, start = read_safetensors(f, folder)
        headers[f] = (entries, start)
        for name, info in entries.items():
            if name in found:
                raise CheckpointError(f"{f}: tensor {validate.shown_name(name)} is also in {where[name]}")
            if weight_map is not None and weight_map.get(name) != fname:
                raise CheckpointError(f"{Path(folder) / INDEX_FILE}: tensor {validate.shown_name(name)} lies in "
                                      f"{fname} but weight_map says {validate.shown(weight_map.get(name))}")
            found[name], where[name] = (info["dtype"], info["shape"]), f
    if weight_map is not None:
        absent = sorted(set(weight_map) - set(found))
        if absent:
            raise CheckpointError(f"{Path(folder) / INDEX_FILE}: tensor {validate.shown_name(absent[0])} is not in "
                                  f"its shard {weight_map[absent[0]]}")
    missing = [n for n in expected if n not in found]
    if missing:
        raise CheckpointError(f"{folder}: missing tensor {missing[0]}"
                              + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = [n for n in found if n not in expected]
    if extra:
        raise CheckpointError(f"{folder}: unexpected tensor {validate.shown_name(extra[0])}"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else "")
                              + " (config and weights do not match)")
    for name, shape in expected.items():
        if found[name][1] != shape:
            raise CheckpointError(f"{where[name]}: tensor {name} has shape {list(found[name][1])}, "
                                  f"config says {list(shape)}")
    quantized = set(quant["layers"]) if quant else set()
    dtype = validate.check_dtypes({n: d for n, (d, _) in found.items()}, quantized, where)
    if check_values:
        for f, (entries, start) in headers.items():
            validate.check_finite(f, entries, start)
    return config, doc, where, dtype


# --- sharding ------------------------------------------------------------------------------------

def plan_shards(sizes: dict[str, int], shard_size: int | None) -> list[list[str]]:
    """Split names (in order) into groups of at most shard_size bytes (one group when None)."""
    if not shard_size:
        return [list(sizes)]
    shards, current, used = [], [], 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > shard_size:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    return shards + [current] if current else shards


def shard_names(n: int) -> list[str]:
    return [WEIGHTS_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def index_document(shards: list[list[str]], total_bytes: int) -> dict:
    files = shard_names(len(shards))
    return {"metadata": {"total_size": total_bytes},
            "weight_map": {name: files[i] for i, names in enumerate(shards) for name in names}}


# --- crash-safe writes ---------------------------------------------------------------------------
# A folder X is replaced so that a kill at any instant leaves a complete copy, old or new, that
# the next reader finds (docs/FORMAT.md, "Crash-safe writes"; docs/DESIGN.md says why):
#   1. write into .X.tmp-<id>                      incomplete until renamed: never used, deleted later
#   2. fsync it, rename it to .X.new-<id>          the rename is the "complete" marker
#   3. rename X (if any) to .X.old-<id>            X was complete, so .old is
#   4. rename .X.new-<id> to X
#   5. delete .X.old-<id>
# recover_folder(X) runs before every write and in the readers of model folders and training
# checkpoints: when X is missing it renames the newest .X.new-* (else .X.old-*) to X, then deletes
# every leftover. <id> is "<pid>-<random>": leftovers of a process that still runs (a concurrent
# writer) are left alone. A single file is replaced by one rename of .NAME.tmp-<id> (atomic_file).
_TMP, _NEW, _OLD = "tmp", "new", "old"
crash_hook = None  # tests only: called with the name of each step of atomic_folder, to kill the process there


def _step(name: str) -> None:
    if crash_hook is not None:
        crash_hook(name)


def _leftovers(path: Path, kind: str) -> list[Path]:
    """The .PATH.<kind>-<id> siblings of path, newest first."""
    prefix = f".{path.name}.{kind}-"
    try:
        found = [p for p in path.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # no parent folder (yet), or not a folder: nothing left over
        return []
    return sorted(found, key=lambda p: p.lstat().st_mtime_ns, reverse=True)


def _owner_alive(path: Path, kind: str) -> bool:
    """Whether the process that made this leftover still runs (then it may be writing it now)."""
    pid = path.name.rsplit(f".{kind}-", 1)[1].split("-", 1)[0]
    if not pid.isdigit():  # not made by this code (an older version's): nobody writes it now
        return False
    if int(pid) == os.getpid():
        return True
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # exists, owned by someone else
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):  # gone already, or not ours to delete: left for later
            path.unlink()


def recover_folder(path: str | os.PathLike) -> None:
    """Finish what a killed atomic_folder left: put back a complete copy when `path` is missing,
    delete the temporaries of processes that are gone."""
    path = Path(path)
    if not os.path.lexists(path):
        complete = [p for kind in (_NEW, _OLD) for p in _leftovers(path, kind) if not _owner_alive(p, kind)]
        if complete:
            try:
                os.rename(complete[0], path)
            except OSError as e:
                raise CheckpointError(f"{path}: missing; an interrupted write left a complete copy in "
                                      f"{complete[0]} that cannot be moved back ({e.strerror})") from None
            _fsync_dir(path.parent)
    for kind in (_TMP, _NEW, _OLD):
        for p in _leftovers(path, kind):
            if not _owner_alive(p, kind):
                _remove(p)


def _make_parent(path: Path) -> None:
    """Create the folders above `path`; a file in the way is a NotADirectoryError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        blocking = next(p for p in [path.parent, *path.parent.parents] if os.path.lexists(p))
        raise NotADirectoryError(errno.ENOTDIR, f"is a file, not a folder, so {path} cannot be written",
                                 str(blocking)) from None


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some platforms and file systems cannot sync a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush every file under `folder` to disk, so that the rename marking it complete comes after its data."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(root))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, overwrite: bool = False):
    """Yield a temporary folder beside `path`; on success it replaces `path` (steps 1-5 above).

    An existing `path` is refused unless overwrite=True. On an error the temporaries are removed and
    `path` is left as it was; after a kill, recover_folder (run by the next write or read) finds the
    old or the new complete copy.
    """
    path = Path(path)
    recover_folder(path)
    if os.path.lexists(path) and not overwrite:
        raise CheckpointError(f"{path}: already exists (pass overwrite=True / --force to replace it)")
    _make_parent(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a model folder is an ordinary folder
    ident = tmp.name.rsplit(f".{_TMP}-", 1)[1]
    new, old = path.with_name(f".{path.name}.{_NEW}-{ident}"), path.with_name(f".{path.name}.{_OLD}-{ident}")
    try:
        yield tmp
        _step("written")
        _fsync_tree(tmp)
        _step("synced")
        os.rename(tmp, new)
        _fsync_dir(path.parent)
        _step("sealed")
        if os.path.lexists(path):
            os.rename(path, old)
            _step("moved-old")
        os.rename(new, path)
        _fsync_dir(path.parent)
        _step("placed")
        _remove(old)
        _step("removed-old")
    except BaseException:
        if not os.path.lexists(path) and os.path.lexists(old):  # an error (not a kill) between 3 and 4
            os.rename(old, path)
        for p in (tmp, new, old):
            _remove(p)
        raise


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, overwrite: bool = True):
    """Yield a temporary file path beside `path`; on success it replaces `path` in one rename.
    Temporaries left by killed processes are deleted first."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise CheckpointError(f"{path}: already exists")
    _make_parent(path)
    for p in _leftovers(path, _TMP):
        if not _owner_alive(p, _TMP):
            _remove(p)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{_TMP}-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json(path: str | os.PathLike, doc: dict) -> None:
    with atomic_file(path) as tmp:
        tmp.write_text(json.dumps(doc, indent=2) + "\n")

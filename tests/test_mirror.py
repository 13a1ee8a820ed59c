"""The mirror (STYLE rule 2): sleep_torch/ and sleep_mlx/ hold the same files, and in each file the
same module-level functions, classes, class members and variables, with the same parameters
(names, order, kinds, which have defaults, and the defaults themselves where they are plain values).

Only what a module defines itself counts (top-level `def`, `class` and assignments in its own
source), never what it imports. Annotations are not compared (torch.Tensor vs mx.array). A torch
nn.Module's `forward` is compared with the MLX module's `__call__` (each framework's name for it).
Every other difference must be listed in ALLOWED below with the reason the frameworks force it;
the failure message lists each unlisted difference on its own line, ready to fix or to allow.
"""
import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BACKENDS = ("torch", "mlx")

# (entry, difference) -> why it is allowed. entry is "module:name" or "module:Class.member";
# difference is "torch only", "mlx only" or "signature" (both have it, with other parameters).
ALLOWED = {
    # ops.py
    ("ops:_fla_scan", "torch only"):
        "torch's long kernel path is flash-linear-attention; MLX has no chunked Metal kernel",
    ("ops:_unstack", "mlx only"):
        "torch's unbind has a stacking backward; MLX indexing in a loop has an O(T^2) vjp",
    ("ops:_unstack0", "mlx only"): "the custom op behind _unstack",
    ("ops:_unstack0_vjp", "mlx only"): "its vjp",
    ("ops:_unit_lower_inverse", "mlx only"):
        "MLX has no vjp for its triangular solve/inverse; torch uses solve_triangular",
    ("ops:_unit_lower_inverse_vjp", "mlx only"): "its hand-written vjp",
    ("ops:COMPILE", "mlx only"): "the MLX chunk core is mx.compile'd (switch to debug it)",
    ("ops:_compiled_core", "mlx only"): "the cache of mx.compile'd chunk cores",
    ("ops:_compiled_step", "mlx only"): "the cache of mx.compile'd decode steps (torch.compile did not pay on CPU)",
    ("ops:_KERNEL_SOURCE", "mlx only"):
        "mx.fast.metal_kernel takes the kernel body as a string; torch's Triton kernel is a Python function",
    ("ops:_differentiable_kernel", "mlx only"):
        "the Metal kernel has no backward: a custom vjp recomputes through the chunked form "
        "(torch trains through fla instead)",
    # io.py
    ("io:load", "signature"): "torch takes device=; MLX has unified memory and no device",
    ("io:_load_quantized", "mlx only"):
        "quantized folders use MLX's packed layout (nn.quantize) and load in MLX only; torch's load refuses them",
    # model.py
    ("model:HybridLM._stream", "signature"):
        "materialize=True (MLX step) mx.eval's each window so a long stream's lazy graph stays bounded; "
        "torch runs eagerly",
    # train.py
    ("train:_train", "signature"): "torch's rank, world, device: DDP over CUDA devices; MLX trains on one device",
    ("train:setup_distributed", "torch only"): "DDP (torch.distributed); MLX has no multi-device training here",
    ("train:rng_state", "signature"): "torch keeps a generator per CUDA device beside the CPU one; MLX one global key",
    ("train:set_rng_state", "signature"): "the same",
    ("train:zeropower_via_newtonschulz", "torch only"):
        "torch's own float32 Newton-Schulz for its Muon; mlx.optimizers.Muon has it built in",
    ("train:build_optimizers", "signature"): "ns_dtype: the dtype of torch's own Newton-Schulz",
    ("train:Muon.__init__", "signature"):
        "each Muon takes its framework's optimizer arguments: torch.optim's (params, lr, ...) plus ns_dtype, "
        "mlx.optimizers.Muon's (learning_rate, ...)",
    ("train:Muon.step", "torch only"): "torch.optim.Optimizer's update method",
    ("train:Muon.apply_single", "mlx only"): "mlx.optimizers.Optimizer's update method",
    ("train:optimizer_step", "mlx only"):
        "MLX optimizers update a parameter tree they are handed: this splits the gradients between the two "
        "(torch: muon.step(); adamw.step())",
    ("train:_param_names", "mlx only"): "the names of each optimizer's part of the tree, for optimizer_step",
    ("train:FLOAT32_PARAMS", "mlx only"):
        "MLX has no autocast: bf16 training runs bf16 copies of the weights, except these float32 ones",
}


def module_names(backend):
    return sorted(p.stem for p in (ROOT / f"sleep_{backend}").glob("*.py"))


def _default(value):
    """A default as compared: plain values by value, anything else (framework dtypes, objects) by presence."""
    plain = (type(None), bool, int, float, str)
    if isinstance(value, plain) or (isinstance(value, tuple) and all(isinstance(x, plain) for x in value)):
        return repr(value)
    return "<value>"


def _signature_of_object(obj):
    """[(name, kind, default)], default None for none; None when inspect cannot tell."""
    try:
        sig = inspect.signature(obj)
    except (TypeError, ValueError):
        return None
    empty = inspect.Parameter.empty
    return [(p.name, p.kind.name, None if p.default is empty else _default(p.default))
            for p in sig.parameters.values()]


def _signature_of_def(node):
    """The same from a `def` in the source (for objects inspect cannot read, such as mx.custom_function)."""
    a = node.args

    def default(expr):
        try:
            return _default(ast.literal_eval(expr))
        except ValueError:
            return "<value>"

    positional = [(x, "POSITIONAL_ONLY") for x in a.posonlyargs] + [(x, "POSITIONAL_OR_KEYWORD") for x in a.args]
    defaults = [None] * (len(positional) - len(a.defaults)) + [default(d) for d in a.defaults]
    out = [(x.arg, kind, d) for (x, kind), d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", None))
    out += [(x.arg, "KEYWORD_ONLY", None if d is None else default(d)) for x, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", None))
    return out


def _assigned_names(body):
    """Names bound by assignments among these statements (a, b = ... counts both)."""
    names = []
    for node in body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(
            node, ast.AnnAssign) else []
        for target in targets:
            names += [n.id for n in ast.walk(target) if isinstance(n, ast.Name)]
    return names


def _member_kind(value):
    if isinstance(value, staticmethod):
        return "staticmethod", value.__func__
    if isinstance(value, classmethod):
        return "classmethod", value.__func__
    if isinstance(value, property):
        return "property", None
    if inspect.isfunction(value) or callable(value):
        return "method", value
    return "attribute", None


def _class_entries(module_key, cls, node):
    """Members defined in the class body, plus a generated __init__ / __new__ (dataclass, NamedTuple).

    A torch nn.Module's forward is entered as __call__, the MLX name for the same method."""
    defs = {n.name: n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    names = list(defs) + _assigned_names(node.body)
    names += [n for n in ("__init__", "__new__") if n in vars(cls) and n not in names]
    entries = {}
    for name in names:
        value = vars(cls).get(name)
        kind, fn = _member_kind(value) if name in vars(cls) else ("attribute", None)
        if name in defs and kind == "attribute":  # a def replaced by a decorator's object
            kind = "method"
        sig = None
        if kind in ("method", "staticmethod", "classmethod"):
            sig = _signature_of_object(fn) if fn is not None else None
            if sig is None and name in defs:
                sig = _signature_of_def(defs[name])
        if name == "forward" and _is_torch_module(cls):
            name = "__call__"
        entries[f"{module_key}:{cls.__name__}.{name}"] = (kind, sig)
    return entries


def _is_torch_module(cls):
    return any(f"{c.__module__}.{c.__name__}" == "torch.nn.modules.module.Module" for c in cls.__mro__)


def collect(backend, name):
    """{entry: (kind, signature)} for what module sleep_<backend>.<name> defines itself."""
    module = importlib.import_module(f"sleep_{backend}.{name}")
    tree = ast.parse(Path(module.__file__).read_text())
    entries = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            obj = getattr(module, node.name)
            sig = _signature_of_object(obj) if inspect.isfunction(inspect.unwrap(obj)) else None
            entries[f"{name}:{node.name}"] = ("function", sig if sig is not None else _signature_of_def(node))
        elif isinstance(node, ast.ClassDef):
            entries[f"{name}:{node.name}"] = ("class", None)
            entries.update(_class_entries(name, getattr(module, node.name), node))
        else:
            entries.update({f"{name}:{n}": ("variable", None) for n in _assigned_names([node])})
    return entries


def _show(kind, sig):
    if sig is None:
        return kind
    params = ", ".join(f"{n}[{k.lower().replace('_', '-')}]" + ("" if d is None else f"={d}") for n, k, d in sig)
    return f"{kind}({params})"


def differences(torch_entries, mlx_entries):
    """[(entry, difference, detail)] between the two backends' entries."""
    out = []
    for entry in sorted(set(torch_entries) | set(mlx_entries)):
        t, m = torch_entries.get(entry), mlx_entries.get(entry)
        if m is None:
            out.append((entry, "torch only", _show(*t)))
        elif t is None:
            out.append((entry, "mlx only", _show(*m)))
        elif t != m:
            out.append((entry, "signature", f"torch {_show(*t)}\n        mlx   {_show(*m)}"))
    return out


def all_differences():
    pytest.importorskip("mlx.core")
    out = []
    for name in module_names("torch"):
        out += differences(collect("torch", name), collect("mlx", name))
    return out


def test_same_files():
    assert module_names("torch") == module_names("mlx"), (
        f"sleep_torch/ has {module_names('torch')}, sleep_mlx/ has {module_names('mlx')}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_module_imports(backend):
    if backend == "mlx":
        pytest.importorskip("mlx.core")
    for name in module_names(backend):
        importlib.import_module(f"sleep_{backend}.{name}")


def test_same_names_and_signatures():
    unlisted = [d for d in all_differences() if d[:2] not in ALLOWED]
    lines = [f"  {entry}  [{diff}]  {detail}" for entry, diff, detail in unlisted]
    assert not unlisted, (
        f"{len(unlisted)} difference(s) between sleep_torch/ and sleep_mlx/ that ALLOWED in "
        f"tests/test_mirror.py does not list; mirror them, or allow each with its reason:\n" + "\n".join(lines))


def test_allowed_differences_still_exist():
    """An entry of ALLOWED whose difference is gone is stale: delete it, so the list stays true."""
    found = {d[:2] for d in all_differences()}
    stale = [f"  {entry}  [{diff}]" for entry, diff in ALLOWED if (entry, diff) not in found]
    assert not stale, "ALLOWED lists differences that no longer exist:\n" + "\n".join(stale)


def test_comparison_catches_each_kind_of_drift():
    """The comparison itself: order, kind, default value, default presence and extra parameters."""
    def entry(source):
        return {"m:f": ("function", _signature_of_def(ast.parse(source).body[0]))}

    base = entry("def f(a, b, *, c=1): pass")
    assert differences(base, entry("def f(a, b, *, c=1):\n    return a")) == []
    for drifted in ["def f(b, a, *, c=1): pass", "def f(a, b, c=1): pass", "def f(a, b, *, c=2): pass",
                    "def f(a, b, *, c): pass", "def f(a, b, *, c=1, d=None): pass", "def f(a, *b, c=1): pass"]:
        assert [d[:2] for d in differences(base, entry(drifted))] == [("m:f", "signature")], drifted
    assert [d[:2] for d in differences(base, {})] == [("m:f", "torch only")]
    assert [d[:2] for d in differences({}, base)] == [("m:f", "mlx only")]

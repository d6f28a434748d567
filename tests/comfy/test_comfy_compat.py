"""The ComfyUI under test still offers everything in ``tests/comfy_surface.py``, with signatures our calls
bind to, and every method our ComfyUI subclasses override still exists on ComfyUI's base with parameters
we accept. A break names the symbol here instead of failing deep inside a load or a forward.

In-process (run with ComfyUI importable: ``$COMFY_PY -m pytest tests/comfy``); skips without ComfyUI."""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import comfy_surface as surface

P = inspect.Parameter
POSITIONAL = (P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD)


def lookup(dotted: str):
    """The object behind a dotted name: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
            break
        except ModuleNotFoundError as exc:
            if exc.name != ".".join(parts[:i]) and not ".".join(parts[:i]).startswith(f"{exc.name}."):
                raise  # the module exists but something it imports does not: not a missing name
    else:
        raise AssertionError(f"{dotted}: module {parts[0]} does not import")
    for j, attr in enumerate(parts[i:], start=i):
        if not hasattr(obj, attr):
            raise AssertionError(f"{dotted}: {'.'.join(parts[:j])} has no attribute {attr!r}")
        obj = getattr(obj, attr)
    return obj


def call_problems(fn, nargs: int, kwargs=(), probed=()) -> list[str]:
    """Why ``fn(*nargs values, **kwargs)`` would not bind (empty when it would). ``probed`` keywords
    count as passed when the signature has them (the caller asks inspect first)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return []  # a C builtin without a signature (dict.pop): existence is all we can check
    params = list(sig.parameters.values())
    var_pos = any(p.kind == P.VAR_POSITIONAL for p in params)
    var_kw = any(p.kind == P.VAR_KEYWORD for p in params)
    positional = [p for p in params if p.kind in POSITIONAL]
    passed = set(kwargs) | {k for k in probed if k in sig.parameters}
    problems = []
    if nargs > len(positional) and not var_pos:
        problems.append(f"takes {len(positional)} positional arguments, we pass {nargs}")
    for p in positional[nargs:] + [p for p in params if p.kind == P.KEYWORD_ONLY]:
        if p.default is P.empty and p.name not in passed:
            problems.append(f"requires {p.name!r}, which we do not pass")
    by_keyword = {p.name for p in positional[nargs:]} | {p.name for p in params if p.kind == P.KEYWORD_ONLY}
    for k in kwargs:
        if k not in by_keyword and not var_kw:
            problems.append(f"has no keyword parameter {k!r}")
    return problems


@pytest.fixture(scope="module")
def comfy(comfy_inprocess):
    import comfy.model_management  # noqa: F401  (the harness set --cpu first)

    return comfy_inprocess


@pytest.mark.parametrize("name", sorted(surface.NAMES))
def test_listed_name_exists_with_a_compatible_signature(comfy, name):
    use = surface.NAMES[name]
    obj = lookup(name)
    if use.args is None and not use.kwargs:
        return  # looked up, read or subclassed only: existence is the contract
    problems = call_problems(obj, use.args or 0, use.kwargs, use.probed)
    assert not problems, f"{name}{_sig(obj)}: " + "; ".join(problems)


def _sig(obj) -> str:
    try:
        return str(inspect.signature(obj))
    except (TypeError, ValueError):
        return ""


def test_model_patcher_members(comfy):
    from comfy.model_patcher import ModelPatcher

    cpu = torch.device("cpu")
    patcher = ModelPatcher(torch.nn.Linear(2, 2), load_device=cpu, offload_device=cpu)
    for attr in surface.PATCHER_ATTRS:
        assert hasattr(patcher, attr), f"ModelPatcher has no attribute {attr!r}"
    for method, nargs in surface.PATCHER_METHODS.items():
        assert callable(getattr(patcher, method, None)), f"ModelPatcher has no method {method!r}"
        problems = call_problems(getattr(patcher, method), nargs)
        assert not problems, f"ModelPatcher.{method}{_sig(getattr(patcher, method))}: " + "; ".join(problems)


def test_base_model_members(comfy):
    import comfy.model_base

    for method, nargs in surface.MODEL_METHODS.items():
        fn = getattr(comfy.model_base.BaseModel, method, None)
        assert callable(fn), f"comfy.model_base.BaseModel has no method {method!r}"
        problems = call_problems(fn, nargs + 1)  # + self
        assert not problems, f"BaseModel.{method}{_sig(fn)}: " + "; ".join(problems)
    source = inspect.getsource(comfy.model_base)
    for flag in surface.MODEL_FLAGS_COMFY_READS:
        assert f"self.{flag}" in source, f"comfy/model_base.py no longer reads {flag!r}, which the bridge sets for it"


def test_mixed_precision_linear_members(comfy):
    import comfy.ops

    base = comfy.ops.mixed_precision_ops({}, torch.float32, full_precision_mm=False, disabled=[])
    assert hasattr(base, "Linear"), "comfy.ops.mixed_precision_ops(...) has no Linear"
    layer = base.Linear(4, 4, device="cpu", dtype=torch.float32)
    for attr in surface.LINEAR_ATTRS:
        assert hasattr(layer, attr), f"comfy.ops.mixed_precision_ops(...).Linear has no attribute {attr!r}"
    source = inspect.getsource(comfy.ops)
    for flag in surface.LINEAR_FLAGS_COMFY_READS:
        assert flag in source, f"comfy/ops.py no longer reads {flag!r}, which the bridge sets for it"


def test_quantized_tensor_members(comfy):
    from comfy.quant_ops import QuantizedTensor

    from wanquant.nodes.comfy_ops import FP4G32_LAYOUT, FP4G32Layout

    params = FP4G32Layout.Params(scale=torch.ones(4, 1), orig_dtype=torch.float32, orig_shape=(4, 32))
    qt = QuantizedTensor(torch.zeros(4, 16, dtype=torch.uint8), FP4G32_LAYOUT, params)
    for attr in surface.QTENSOR_ATTRS:
        assert hasattr(qt, attr), f"comfy.quant_ops.QuantizedTensor has no attribute {attr!r}"
    assert qt.layout_cls is FP4G32Layout, f"QuantizedTensor.layout_cls is {qt.layout_cls!r}, not the registered class"
    assert tuple(qt.shape) == (4, 32), "a QuantizedTensor no longer reports its logical shape"


def _our_subclasses():
    from wanquant.nodes import WanquantExtension, registry
    from wanquant.nodes.comfy_ops import FP4G32Layout, build_operations

    ops, _ = build_operations("dequant", torch.float32, torch.device("cpu"))
    return [*registry.all_nodes(), WanquantExtension, FP4G32Layout, ops.Linear]


def _comfy_base_with(cls, name):
    for base in cls.__mro__[1:]:
        if not base.__module__.startswith("wanquant") and name in base.__dict__:
            return base
    return None


def test_every_override_exists_on_comfyuis_base_with_parameters_we_accept(comfy):
    problems = []
    for cls in _our_subclasses():
        for name, value in cls.__dict__.items():
            if (name.startswith(("__", surface.OWN_PREFIX)) or name in surface.OWN_METHODS or isinstance(value, type)
                    or not callable(getattr(cls, name))):
                continue
            base = _comfy_base_with(cls, name)
            if base is None:
                problems.append(f"{cls.__name__}.{name}: no ComfyUI base of {cls.__name__} defines {name} "
                                f"(renamed or removed upstream? ComfyUI would never call ours)")
                continue
            problems += [f"{cls.__name__}.{name} vs {base.__module__}.{base.__qualname__}.{name}: {p}"
                         for p in _accepts_base(getattr(cls, name), getattr(base, name))]
    assert not problems, "\n".join(problems)


def _accepts_base(ours, theirs) -> list[str]:
    """Whether every parameter ComfyUI's method declares (so may pass) is accepted by our override."""
    try:
        mine, base = inspect.signature(ours), inspect.signature(theirs)
    except (TypeError, ValueError):
        return []
    mp = list(mine.parameters.values())
    m_pos = [p for p in mp if p.kind in POSITIONAL]
    m_var_pos = any(p.kind == P.VAR_POSITIONAL for p in mp)
    m_var_kw = any(p.kind == P.VAR_KEYWORD for p in mp)
    out = []
    for i, p in enumerate(q for q in base.parameters.values() if q.kind in POSITIONAL):
        if i >= len(m_pos) and not m_var_pos:
            out.append(f"ComfyUI may pass {p.name!r} positionally (#{i}); ours takes {len(m_pos)}")
    for p in base.parameters.values():
        if p.kind in (P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY) and p.name not in mine.parameters and not m_var_kw:
            out.append(f"ComfyUI may pass {p.name!r} by keyword; ours has no such parameter")
    return out

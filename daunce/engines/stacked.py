"""Train a block of copies with shared-input passes: the copies' layers as large matmuls, not thin batched ones.

``daunce.engines.vmap`` evaluates C copies with ``torch.func.vmap``. Where every copy of a block sees the same
examples (full batch, where copy k's batch is its whole subset at every step, or one minibatch order shared by
the copies), that wastes most of a CPU: vmap either gathers each copy's own examples (C x B rows copied every
step) or, given one shared batch, multiplies it by each copy's weight matrix separately (one thin matmul per
copy). Here the model is evaluated layer by layer on stacked weights ``(C, *shape)``:

* the first trainable layer runs **once for all copies** on the union of the copies' batches: a linear layer
  is one ``(N, d_in) @ (d_in, C * d_out)`` matmul, a convolution one convolution with ``C * c_out`` output
  channels; each copy's subset then enters as a per-example weight on its objective (``1/B`` for the examples of
  its batch, 0 for the others), so the gradient of every copy is exactly its own batch's;
* later linear layers are batched matmuls ``(C, N, h) @ (C, h, o)``, later convolutions grouped convolutions
  (``groups=C``), activations and pooling run on the stacked tensor as they are.

For a full batch there is a second layout, ``"gather"``: each copy's subset is gathered once per block (not at
every step) and every layer is batched, so a copy does the arithmetic of its own subset only. The union layout
does ``1 / r`` times the arithmetic of a copy's subset (r: the subset ratio) in larger, faster matmuls; which of
the two is faster depends on the layer shapes (on ``02_vision_lds``'s logistic regression the union, on its MLP
the gathered layout), so ``layout="auto"`` decides by the first trainable layer's width (``GATHER_MIN_WIDTH``;
``SharedInputTrainer.layout_report`` says why). Both minimise every copy's own objective on its own batch, so the copies
are the sequential loop's up to float rounding (``tests/test_stacked.py``).

Supported models: a lone ``Linear`` or convolution, an ``nn.Sequential`` (nested too) of ``Linear``,
``Conv1d/2d/3d`` (``groups=1``, zero padding), ``Flatten`` and parameter-free activation, pooling, dropout (in
eval mode) and identity modules, or any other module whose ``forward`` ``torch.fx.symbolic_trace`` traces into a
single chain of such modules and the functions people write for them in ``forward`` (``F.relu``, ``torch.tanh``,
``x.sigmoid()``, ``F.gelu`` ...; ``F.max_pool2d``, ``F.avg_pool2d``, the adaptive poolings; ``torch.flatten(x, 1)``,
``x.view(x.size(0), -1)``, ``x.reshape(x.shape[0], -1)``; ``F.dropout(x, p, training=self.training)`` in eval
mode); and tasks whose ``outputs(model, batch)`` is ``model(batch[0])`` (checked on a probe batch). A traced graph
with a branch (a residual add, a concatenation), a parameter used outside its module (``F.linear(x, self.w)``),
several inputs or another function is not a chain: ``supported`` names it. Other models keep the vmap or the
sequential trainer (``check`` says why).
"""

from __future__ import annotations

import operator
import warnings
from typing import Optional

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn
from torch.func import vmap as _vmap

from ..config import DaunceConfig
from ..objectives import perturbed_objective
from .context import DEFAULT_MEMORY_BYTES, ModelContext, per_example
from .vmap import VectorisedTrainer, flatten_batch

LAYOUTS = ("auto", "union", "gather")
#: union layout only where the union of a step's batches is at most this many times one copy's batch: beyond it
#: (minibatches drawn independently by many copies) the union costs more arithmetic than it saves in copying
MAX_UNION_RATIO = 4.0
#: ``layout="auto"`` gathers each copy's subset when the first trainable layer has at least this many outputs per
#: copy, else shares the union: on this project's 2-core CPU, float32 batched matmuls of 256 copies x 500
#: examples x 784 inputs ran at 10 GFLOP/s with 10 outputs and 68 with 64 (one large matmul: 64-75), and
#: ``benchmarks/results/copy_throughput.md`` has the union faster on 02's logistic regression (10 outputs) and
#: the gathered layout on its MLP (64 hidden units)
GATHER_MIN_WIDTH = 32

_ELEMENTWISE = (nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid, nn.GELU, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.Softplus,
                nn.Mish, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.Identity, nn.Softsign, nn.Tanhshrink)
_DROPOUT = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_POOL = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
         nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
         nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)
_CONV = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}


def _layers(model: nn.Module, train_mode: bool = False) -> list:
    """The model's leaf modules in call order, or a ``ValueError`` that says why there is no such chain.

    A lone linear or convolution layer is a model of one layer; an ``nn.Sequential`` is flattened (nested ones
    too); any other module is traced with ``torch.fx.symbolic_trace`` (``_traced_layers``: its submodules in the
    order ``forward`` calls them, and the functions it calls as modules), in ``train_mode``'s mode (what
    ``self.training`` reads)."""
    if isinstance(model, nn.Linear) or type(model) in _CONV:
        return [model]
    if not isinstance(model, nn.Sequential):
        return _traced_layers(model, train_mode)
    out = []
    for m in model:
        out.extend(_layers(m) if isinstance(m, nn.Sequential) else [m])
    return out


# ----------------------------------------------------------------------------------- models traced by torch.fx
# A function called in ``forward`` stands for the module that computes the same thing: target -> (module class,
# the names of its arguments after the input, in order). ``inplace`` is read and dropped (the module works out of
# place). ``"method:name"`` keys are tensor methods (``x.relu()``).
_ACT = {"relu": (nn.ReLU, ("inplace",)), "relu6": (nn.ReLU6, ("inplace",)), "tanh": (nn.Tanh, ()),
        "sigmoid": (nn.Sigmoid, ()), "gelu": (nn.GELU, ("approximate",)), "silu": (nn.SiLU, ("inplace",)),
        "elu": (nn.ELU, ("alpha", "inplace")), "leaky_relu": (nn.LeakyReLU, ("negative_slope", "inplace")),
        "softplus": (nn.Softplus, ("beta", "threshold")), "mish": (nn.Mish, ("inplace",)),
        "hardtanh": (nn.Hardtanh, ("min_val", "max_val", "inplace")), "hardswish": (nn.Hardswish, ("inplace",)),
        "hardsigmoid": (nn.Hardsigmoid, ("inplace",)), "softsign": (nn.Softsign, ()),
        "tanhshrink": (nn.Tanhshrink, ())}
_MAX_POOL = ("kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_AVG_POOL = ("kernel_size", "stride", "padding", "ceil_mode", "count_include_pad", "divisor_override")


def _function_table() -> dict:
    """Activation and pooling functions (``F.relu``, ``torch.relu``, ``x.relu()``, ``F.max_pool2d`` ...) -> their
    module and argument names."""
    table: dict = {}
    for name, spec in _ACT.items():
        for ns in (F, torch):
            if hasattr(ns, name):
                table[getattr(ns, name)] = spec
        if hasattr(torch.Tensor, name):
            table["method:" + name] = spec
    for d in (1, 2, 3):
        table[getattr(F, f"max_pool{d}d")] = (getattr(nn, f"MaxPool{d}d"), _MAX_POOL)
        table[getattr(F, f"avg_pool{d}d")] = (getattr(nn, f"AvgPool{d}d"), _AVG_POOL[:5 if d == 1 else 6])
        table[getattr(F, f"adaptive_avg_pool{d}d")] = (getattr(nn, f"AdaptiveAvgPool{d}d"), ("output_size",))
        table[getattr(F, f"adaptive_max_pool{d}d")] = (getattr(nn, f"AdaptiveMaxPool{d}d"),
                                                       ("output_size", "return_indices"))
    return table


_FUNCTIONS = _function_table()
_FLATTEN = (torch.flatten, "method:flatten")
_RESHAPE = (torch.reshape, "method:view", "method:reshape")
_DROPOUT_FNS = {fn: ("p", "training", "inplace") for fn in (F.dropout, F.dropout1d, F.dropout2d, F.dropout3d,
                                                               F.alpha_dropout, F.feature_alpha_dropout)}
_DROPOUT_FNS[torch.dropout] = ("p", "train")
_IDENTITY = ("method:contiguous",)


def _fn_name(node) -> str:
    """How ``node``'s operation reads in ``forward``: ``torch.nn.functional.linear``, ``torch.add``,
    ``operator.add``, ``the method .view()``, ``module fc1 (Linear)``."""
    if node.op == "call_method":
        return f"the method .{node.target}()"
    if node.op == "call_module":
        return f"module {node.target}"
    if node.op == "get_attr":
        return f"attribute {node.target}"
    if node.op == "placeholder":
        return f"the input {node.target}"
    t = node.target
    for prefix, ns in (("torch.nn.functional", F), ("torch", torch), ("operator", operator)):
        name = getattr(t, "__name__", None)
        if name and getattr(ns, name, None) is t:
            return f"{prefix}.{name}"
        for n in dir(ns):
            if not n.startswith("_") and getattr(ns, n, None) is t:
                return f"{prefix}.{n}"
    return f"{getattr(t, '__module__', None) or ''}.{getattr(t, '__qualname__', repr(t))}".lstrip(".")


def _key(node):
    return "method:" + node.target if node.op == "call_method" else node.target


def _size_nodes(graph) -> dict:
    """Nodes that compute a tensor's batch size (``x.size(0)``, ``x.shape[0]``, ``x.size()[0]``) -> that tensor's
    node, and the nodes of its whole shape (``x.shape``, ``x.size()``) -> ``(tensor node, "shape")``."""
    out: dict = {}
    for node in graph.nodes:
        if node.op == "call_method" and node.target == "size" and node.args:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            out[node] = node.args[0] if dim == 0 else ((node.args[0], "shape") if dim is None else None)
        elif node.op == "call_function" and node.target is getattr and node.args[1:] == ("shape",):
            out[node] = (node.args[0], "shape")
        elif (node.op == "call_function" and node.target is operator.getitem
              and isinstance(out.get(node.args[0]), tuple)):
            out[node] = out[node.args[0]][0] if node.args[1] == 0 else None
    return {n: v for n, v in out.items() if v is not None}


def _arguments(node, names: tuple, what: str) -> dict:
    """The arguments of ``node`` after its input, by name (``names``, in positional order), or a ``ValueError``."""
    rest = node.args[1:]
    if len(rest) > len(names):
        raise ValueError(f"{what} with {len(rest)} positional arguments after the input is not supported")
    kw = dict(zip(names, rest))
    for k, v in node.kwargs.items():
        if k not in names:
            raise ValueError(f"{what} with the argument {k}={v!r} is not supported")
        kw[k] = v
    if any(isinstance(v, torch.fx.Node) for v in kw.values()):
        raise ValueError(f"{what} with an argument computed in forward is not supported")
    return kw


def _as_module(node, model: nn.Module, size: dict, what: str) -> nn.Module:
    """The module that computes what ``node`` computes on its input, or a ``ValueError``."""
    if node.op == "call_module":
        return model.get_submodule(node.target)
    key = _key(node)
    if key in _FUNCTIONS:
        cls, names = _FUNCTIONS[key]
        kw = _arguments(node, names, what)
        kw.pop("inplace", None)
        if kw.pop("return_indices", False):
            raise ValueError(f"{what} with return_indices=True returns two tensors: not supported")
        return cls(**kw)
    if key in _FLATTEN:
        kw = _arguments(node, ("start_dim", "end_dim"), what)
        start, end = kw.get("start_dim", 0), kw.get("end_dim", -1)
        if (start, end) != (1, -1):
            raise ValueError(f"{what} flattens dims {start}..{end}: only flatten(x, 1) (start_dim=1, end_dim=-1), "
                             "which keeps the batch dimension, is supported")
        return nn.Flatten()
    if key in _RESHAPE:
        shape = node.args[1:] if key != torch.reshape else tuple(node.args[1:]) + tuple(node.kwargs.values())
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        if (len(shape) != 2 or not isinstance(size.get(shape[0]), torch.fx.Node)
                or not (isinstance(shape[1], int) and (shape[1] == -1 or shape[1] > 0))):
            raise ValueError(f"{what} with a shape other than (x.size(0), -1) (or x.shape[0]): the shared-input "
                             "trainer keeps the batch dimension of every layer")
        return nn.Flatten()
    if key in _DROPOUT_FNS:
        kw = _arguments(node, _DROPOUT_FNS[key], what)
        if kw.get("training", kw.get("train", True)):
            raise ValueError(f"{what} with training=True (the function's default, or self.training in training "
                             "mode): it draws a new mask at every call; pass training=self.training and "
                             "train_mode=False")
        return nn.Identity()
    if key in _IDENTITY:
        _arguments(node, (), what)
        return nn.Identity()
    raise ValueError(f"{what}, which the shared-input trainer does not evaluate on stacked copies (it evaluates "
                     "supported modules, the functional activations, pooling, flatten/view/reshape to (batch, -1) "
                     "and dropout with training=False)")


def _traced_layers(model: nn.Module, train_mode: bool) -> list:
    """The modules of ``model``'s forward, traced with ``torch.fx``, when the graph is one chain: one input,
    every operation on the output of the one before, one output; a ``ValueError`` that says where it is not."""
    name = f"{type(model).__name__}.forward"
    modes = [(m, m.training) for m in model.modules()]
    model.train(train_mode)  # ``self.training`` is read while tracing
    try:
        with warnings.catch_warnings():  # what forward warns about while traced is not the user's concern here
            warnings.simplefilter("ignore")
            graph = torch.fx.symbolic_trace(model).graph
    except Exception as e:  # noqa: BLE001 - any failure to trace means: not a chain we can read
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"torch.fx could not trace {name}: {type(e).__name__}: {first[:300]}") from e
    finally:
        for m, mode in modes:
            m.training = mode
    nodes = list(graph.nodes)
    inputs = [n for n in nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise ValueError(f"{name} takes {len(inputs)} inputs ({', '.join(n.target for n in inputs)}): the "
                         "shared-input trainer evaluates models called as model(x) on one tensor")
    size = _size_nodes(graph)
    for node in nodes:  # direct parameter reads and merges first: they name the reason best
        if node.op == "get_attr":
            users = ", ".join(_fn_name(u) for u in node.users)
            raise ValueError(f"{name} reads the tensor {node.target} directly (in {users}): the shared-input "
                             "trainer stacks parameters only inside the modules it evaluates (nn.Linear, "
                             "nn.Conv1d/2d/3d called as modules)")
        tensors = [a for a in _node_args(node) if a not in size]
        if node.op != "output" and len(tensors) > 1:
            raise ValueError(f"{name} uses {_fn_name(node)} on {_count(len(tensors))} tensors (a branch: "
                             f"{', '.join(a.name for a in tensors)}): the shared-input trainer evaluates a single "
                             "chain of layers (no residual connection, concatenation or merge)")
    layers, current = [], inputs[0]
    chain = {current}  # the chain's nodes so far: the batch size of any of them is the batch size
    for node in nodes[nodes.index(current) + 1:]:
        if node in size:
            continue
        users = [u for u in current.users if u not in size]
        if len(users) != 1:
            what = "its input " + current.name if current.op == "placeholder" else "the output of " + _fn_name(current)
            ops = ", ".join(_fn_name(u) for u in users) or "none"
            raise ValueError(f"{name} uses {what} in {_count(len(users))} operations ({ops}): the shared-input "
                             "trainer evaluates a single chain of layers")
        if node.op == "output":
            if node.args[0] is not current:
                out = node.args[0]
                what = (f"a {type(out).__name__} of {len(out)} values" if isinstance(out, (tuple, list, dict))
                        else f"{_fn_name(out) if isinstance(out, torch.fx.Node) else repr(out)}, not its last layer")
                raise ValueError(f"{name} returns {what}: the shared-input trainer evaluates models that return the "
                                 "one tensor of their last layer")
            break
        for a in _node_args(node):
            if a in size and (size[a] not in chain or _key(node) not in _RESHAPE):
                raise ValueError(f"{name} passes a tensor's shape to {_fn_name(node)}: only the batch size, in "
                                 "x.view(x.size(0), -1) or x.reshape(x.shape[0], -1), is supported")
        args = [a for a in _node_args(node) if a not in size]
        if args != [current]:
            raise ValueError(f"{name}: {_fn_name(node)} does not take the output of {_fn_name(current)} as its "
                             "input: the shared-input trainer evaluates a single chain of layers")
        layer = _as_module(node, model, size, f"{name} calls {_fn_name(node)}")
        if node.args[:1] != (current,):
            raise ValueError(f"{name} calls {_fn_name(node)} with its input {current.name} other than as the "
                             "first positional argument: not supported")
        layers.append(layer)
        current = node
        chain.add(node)
    return layers


def _count(n: int) -> str:
    return {0: "no", 1: "one", 2: "two", 3: "three"}.get(n, str(n))


def _node_args(node) -> list:
    """Every ``torch.fx.Node`` among ``node``'s arguments (nested in tuples, lists and dicts), with repeats."""
    found: list = []
    torch.fx.node.map_arg((node.args, node.kwargs), lambda a: found.append(a) or a)
    return found


def supported(model: nn.Module, train_mode: bool = False) -> tuple[bool, str]:
    """Whether ``StackedForward`` can evaluate ``model``: ``(ok, reason)``. ``reason`` names what is not supported:
    a module, a function ``forward`` calls, a branch, or why ``torch.fx`` could not trace ``forward``."""
    try:
        layers = _layers(model, train_mode)
    except ValueError as e:
        return False, str(e)
    for m in layers:
        if isinstance(m, nn.Linear):
            continue
        if type(m) in _CONV:
            if m.groups != 1 or m.padding_mode != "zeros" or isinstance(m.padding, str):
                return False, f"{type(m).__name__} with groups/padding_mode/string padding is not supported"
            if not m.weight.requires_grad:
                return False, f"a frozen {type(m).__name__} is not supported by the shared-input trainer"
            continue
        if isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                return False, "only nn.Flatten(start_dim=1) is supported"
            continue
        if isinstance(m, _DROPOUT):
            if train_mode:
                return False, f"{type(m).__name__} is stochastic and train_mode=True"
            continue
        if isinstance(m, _ELEMENTWISE + _POOL):
            continue
        return False, f"module {type(m).__name__} is not supported by the shared-input trainer"
    if isinstance(model, nn.Sequential) or isinstance(model, nn.Linear) or type(model) in _CONV:
        return True, f"nn.Sequential of {len(layers)} supported layers"
    return True, f"{type(model).__name__}.forward traced by torch.fx into a chain of {len(layers)} supported layers"


class StackedForward:
    """Evaluates C copies of a supported model (``supported``: an ``nn.Sequential``, or a module whose ``forward``
    ``torch.fx`` traces into a chain of supported operations) from their stacked trainable tensors. Each layer's
    parameters are found by identity among ``ctx.params`` (the order of ``ctx.names``), so a traced model's
    ``fc1.weight`` is the stacked tensor of that name, and a frozen parameter (not in ``ctx.params``) is the
    module's own tensor, shared by every copy. ``train_mode``: the mode ``forward`` is traced in (what
    ``self.training`` reads, e.g. in ``F.dropout``).

    A tensor between layers is in one of three layouts: ``"shared"`` ``(N, ...)`` (the same for every copy: no
    trainable layer yet), ``"copy"`` ``(C, N, ...)`` and ``"chan"`` ``(N, C * channels, ...)`` (the copies'
    channels side by side, the layout of grouped convolutions and pooling)."""

    def __init__(self, ctx: ModelContext, train_mode: bool = False):
        self.layers = _layers(ctx.model, train_mode)
        index = {id(p): j for j, p in enumerate(ctx.params)}
        self.slots = [{name: index.get(id(p)) for name, p in m.named_parameters(recurse=False)}
                      for m in self.layers]

    def first_width(self) -> int:
        """Outputs per copy (features or channels) of the first layer with a trainable parameter."""
        for j, m in enumerate(self.layers):
            if any(v is not None for v in self.slots[j].values()):
                return m.out_features if isinstance(m, nn.Linear) else m.out_channels
        return 0

    def _param(self, j: int, name: str, params, C: int):
        """``(tensor, stacked)``: the copies' ``(C, *shape)`` tensor, or the module's own (frozen) one."""
        slot = self.slots[j].get(name)
        if slot is not None:
            return params[slot], True
        return getattr(self.layers[j], name), False

    def __call__(self, params, x: torch.Tensor, per_copy: bool = False) -> torch.Tensor:
        """Outputs ``(C, N, ...)`` of the C copies on ``x``: ``(N, ...)`` shared by all copies, or, with
        ``per_copy``, ``(C, N, ...)`` (each copy its own examples)."""
        C = params[0].shape[0]
        h, layout = x, ("copy" if per_copy else "shared")
        for j, m in enumerate(self.layers):
            if isinstance(m, nn.Linear):
                h, layout = self._linear(j, m, params, C, h, layout)
            elif type(m) in _CONV:
                h, layout = self._conv(j, m, params, C, h, layout)
            elif isinstance(m, nn.Flatten):
                if layout == "chan":
                    h, layout = _chan_to_copy(h, C).flatten(2), "copy"
                else:
                    h = h.flatten(2 if layout == "copy" else 1)
            elif isinstance(m, _POOL):
                if layout == "copy":
                    h, layout = _copy_to_chan(h), "chan"
                h = m(h)
            elif isinstance(m, _DROPOUT):
                continue  # eval mode only (``supported``)
            else:
                h = m(h)
        if layout == "shared":
            return h.unsqueeze(0).expand(C, *h.shape)
        # contiguous, as a plain forward pass gives them: the task's per-example functions run on these outputs
        return (_chan_to_copy(h, C) if layout == "chan" else h).contiguous()

    def _linear(self, j, m, params, C, h, layout):
        W, w_stacked = self._param(j, "weight", params, C)
        b, b_stacked = self._param(j, "bias", params, C) if m.bias is not None else (None, False)
        if layout == "chan":
            h, layout = _chan_to_copy(h, C), "copy"
        if not w_stacked:
            out = F.linear(h, W)
            if b is not None:
                out = out + (b[:, None] if b_stacked else b)
            return out, ("copy" if (b_stacked or layout == "copy") else "shared")
        if layout == "shared":  # one matmul for all copies: (N, d) @ (d, C * o)
            o = W.shape[1]
            out = (h @ W.reshape(C * o, -1).T).view(h.shape[0], C, o).transpose(0, 1)
            if b is not None:
                out = out + (b[:, None] if b_stacked else b)
            return out, "copy"
        lead = h.shape[1:-1]
        flat = h.reshape(C, -1, h.shape[-1])
        Wt = W.transpose(1, 2)
        if b is None:
            out = torch.bmm(flat, Wt)
        else:
            bias = b[:, None] if b_stacked else b.expand(C, 1, -1)
            out = torch.baddbmm(bias, flat, Wt)
        return out.view(C, *lead, W.shape[1]), "copy"

    def _conv(self, j, m, params, C, h, layout):
        W, _ = self._param(j, "weight", params, C)  # trainable (``supported``)
        b, b_stacked = self._param(j, "bias", params, C) if m.bias is not None else (None, False)
        conv = _CONV[type(m)]
        if layout == "copy":
            h, layout = _copy_to_chan(h), "chan"
        c_out = W.shape[1]
        bias = None
        if b is not None:
            bias = b.reshape(C * c_out) if b_stacked else b.repeat(C)
        out = conv(h, W.reshape(C * c_out, *W.shape[2:]), bias, m.stride, m.padding, m.dilation,
                   1 if layout == "shared" else C)
        return out, "chan"


def _chan_to_copy(h: torch.Tensor, C: int) -> torch.Tensor:
    """``(N, C * ch, *sp) -> (C, N, ch, *sp)``."""
    N = h.shape[0]
    return h.view(N, C, h.shape[1] // C, *h.shape[2:]).transpose(0, 1)


def _copy_to_chan(h: torch.Tensor) -> torch.Tensor:
    """``(C, N, ch, *sp) -> (N, C * ch, *sp)``."""
    C, N = h.shape[:2]
    return h.transpose(0, 1).reshape(N, C * h.shape[2], *h.shape[3:])


def check(ctx: ModelContext, config: DaunceConfig, train, memory: float = DEFAULT_MEMORY_BYTES
          ) -> tuple[bool, str, int]:
    """Can the copies be trained with shared-input passes? ``(ok, reason, per_copy_bytes)``.

    Needs a supported model (``supported``), a task whose ``outputs(model, batch)`` is ``model(batch[0])`` and a
    full batch (``batch_size=None``: every copy's batch is its subset). ``per_copy_bytes`` bounds one copy's
    memory in a block: weights and optimiser state, the activations of the union of the batches (the training
    set) and its subset's inputs (gathered layout)."""
    minibatch = ("copies train on minibatches of their own subsets: the union of a block's batches is not shared, so "
                 "there is no input to share")
    if config.augment != "none":
        return False, f"augment={config.augment!r}: each copy augments its own inputs, there is no input to share", 0
    if config.batch_size is not None and not isinstance(ctx.model, (nn.Sequential, nn.Linear, *_CONV)):
        return False, minibatch, 0  # before tracing forward: a large model (an LLM) would be traced for nothing
    ok, why = supported(ctx.model, config.train_mode)
    if not ok:
        return False, why, 0
    if config.batch_size is not None:
        return False, minibatch, 0
    probe = torch.arange(min(3, len(train)))
    batch = ctx.fetch(train, probe)
    ctx.reset()
    ctx.model.train(False)
    try:
        with torch.no_grad():
            ref = ctx.outputs(batch)
            direct = ctx.model(batch[0])
            stacked = [t.unsqueeze(0).expand(2, *t.shape) for t in ctx.theta0]
            out = StackedForward(ctx, config.train_mode)(stacked, batch[0])
    except Exception as e:  # noqa: BLE001 - any failure means: not usable
        return False, f"the model does not run layer by layer on stacked weights ({type(e).__name__}: {e})", 0
    close = dict(rtol=1e-4, atol=1e-5)
    if ref.shape != direct.shape or not torch.allclose(ref, direct, **close):
        return False, "task.outputs(model, batch) is not model(batch[0])", 0
    if not (torch.allclose(out[0], ref, **close) and torch.allclose(out[1], ref, **close)):
        return False, "the stacked evaluation differs from the model's own forward pass", 0
    elsize = ctx.params[0].element_size()
    m = max(1, round(config.subset_ratio * len(train)))
    # weights, gradient, optimiser state, theta0 and eta; activations from the first trainable layer on (x3 for
    # their gradients) on the union (the training set); the inputs of the copy's subset (the gathered layout)
    act = _per_copy_activations(ctx.model, batch[0], config.train_mode) / len(probe)
    per_copy = 6 * ctx.n_params * elsize + (3 * int(act) * len(train) + batch[0][0].numel() * m) * elsize
    return True, f"shared-input passes ({why}, {ctx.n_params} trainable parameters)", per_copy


def worthwhile(ctx: ModelContext) -> tuple[bool, str]:
    """Whether shared-input passes are expected to beat the other trainers (used by ``trainer="auto"``).

    On a CPU a model with a trainable convolution keeps the sequential loop: in
    ``benchmarks/results/copy_throughput.md`` ``small_cnn``'s copies ran slower in shared-input passes than one
    after the other (a convolution's output is large next to its arithmetic, so a step is bound by memory
    traffic on the activations, which sharing does not reduce and the union of the subsets multiplies)."""
    if ctx.device.type == "cpu":
        for name, m in ctx.model.named_modules():
            if type(m) in _CONV and m.weight.requires_grad:
                return False, (f"module {name} is a trainable convolution: on a CPU its copies are bound by memory "
                               "traffic on their activations and the sequential loop was faster "
                               "(pass trainer='shared' to force it)")
    return True, ""


@torch.no_grad()
def _per_copy_activations(model: nn.Module, x: torch.Tensor, train_mode: bool = False) -> int:
    """Output elements of the layers from the first one with a trainable parameter on: what each copy holds of
    its own (the layers before it run once, shared by the copies)."""
    total, started, h = 0, False, x
    for m in _layers(model, train_mode):
        h = m(h)
        started = started or any(p.requires_grad for p in m.parameters(recurse=False))
        total += h.numel() if started else 0
    return total


class SharedInputTrainer(VectorisedTrainer):
    """``VectorisedTrainer`` with the shared-input step and signal passes of this module (same plans, same
    optimisers, same stopping test and report). ``layout``: ``"union"``, ``"gather"`` or ``"auto"`` (decided on the
    first block's first step, then kept; ``layout_report`` says why)."""

    def __init__(self, ctx: ModelContext, config: DaunceConfig, layout: str = "auto"):
        super().__init__(ctx, config)
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
        self.layout = layout
        self.forward = StackedForward(ctx, config.train_mode)
        self.layout_report: dict = {}
        self._inputs: Optional[tuple] = None  # (layout, sorted batch indices, step inputs, eps_all) of the last step
        self._prox_buffers: list = []

    # ------------------------------------------------------------------------------ one step's objective
    @torch.no_grad()
    def proximal(self, params: list, damping: float, eta: Optional[list]) -> tuple[torch.Tensor, Optional[list]]:
        """``objectives.proximal_term`` of every copy and its gradient ``damping (theta - theta0) - eta``, in closed
        form: through autograd (and vmap's broadcasting against theta0) it cost as much as the copies' matmuls
        on ``02_vision_lds``'s MLP."""
        C = params[0].shape[0]
        value = params[0].new_zeros(C)
        grads = []
        if len(self._prox_buffers) != len(params) or self._prox_buffers[0].shape != params[0].shape:
            self._prox_buffers = [torch.empty_like(p) for p in params]
        for j, (p, p0) in enumerate(zip(params, self.theta0)):
            # delta, then the gradient, in a buffer kept across steps: a new large tensor every step costs page faults
            g = torch.sub(p, p0, out=self._prox_buffers[j])
            flat = g.view(C, 1, -1)
            if eta is not None:
                value -= torch.bmm(flat, eta[j].reshape(C, -1, 1)).view(C)
            if damping:
                value += 0.5 * damping * torch.bmm(flat, flat.transpose(1, 2)).view(C)
            g.mul_(damping)
            if eta is not None:
                g.sub_(eta[j])
            grads.append(g)
        return value, grads

    def block_objective(self, params, idx: torch.Tensor, train, cache, eps_all) -> torch.Tensor:
        """Every copy's objective ``(C,)`` (without the proximal term) on its batch ``idx[c]``."""
        if self.layout == "auto":
            self.layout = self._choose_layout(idx)
        return self._objective(self.layout, params, idx, train, cache, eps_all)

    def _objective(self, layout: str, params, idx, train, cache, eps_all) -> torch.Tensor:
        inputs = self._step_inputs(layout, idx, train, cache, eps_all)
        out = self.forward(params, inputs["x"], per_copy=layout == "gather")  # (C, N, ...)
        terms = self._terms(out, inputs)
        return (terms * inputs["weights"]).sum(1) if layout == "union" else terms.mean(1)

    def _step_inputs(self, layout: str, idx, train, cache, eps_all) -> dict:
        """What a step needs besides the weights: the examples (the union, or each copy's gathered), each copy's
        weight on them and theta0's cached values and the perturbations at them. A full batch has the same
        examples at every step (only their order changes): built once per block (the same examples and the same
        block's perturbations), then reused."""
        key = idx.sort(1).values
        # the same examples are not enough: at subset ratio 1 every block has them, with its own copies'
        # perturbations (eps_all is built once per block, and anew when stopped copies leave it)
        if (self._inputs is not None and self._inputs[0] == layout and self._inputs[3] is eps_all
                and torch.equal(self._inputs[1], key)):
            return self._inputs[2]
        self._inputs = None  # free the previous block's before building this one's
        C, B = key.shape
        if layout == "union":
            U = torch.unique(key)
            weights = torch.zeros(C, len(U), dtype=self.theta0[0].dtype, device=self.theta0[0].device)
            pos = torch.searchsorted(U, key).to(weights.device)
            weights.scatter_add_(1, pos, torch.full(pos.shape, 1.0 / B, dtype=weights.dtype, device=weights.device))
            batch, examples = self.ctx.fetch(train, U), U.expand(C, -1)
        else:
            weights, batch, examples = None, self.fetch_block(train, key), key
        inputs = dict(x=batch[0], batch=batch, weights=weights, shared=layout == "union")
        if self.config.variant != "bootstrap":
            cidx = examples.reshape(-1).to(cache["loss"].device)
            inputs["kw"] = dict(loss0=cache["loss"][cidx], outputs0=cache["outputs"][cidx],
                                grad0=cache["grad"][cidx],
                                eps=eps_all[torch.arange(C)[:, None], examples.cpu()].reshape(-1).to(
                                    self.theta0[0].device, self.theta0[0].dtype))
            if self.config.variant == "trak":
                inputs["kw"]["f0"] = cache["f"][cidx]
        self._inputs = (layout, key, inputs, eps_all)
        return inputs

    def _terms(self, out, inputs: dict) -> torch.Tensor:
        """Per-example perturbed objective ``(C, N)`` of the copies' outputs ``out`` ``(C, N, ...)``."""
        C, N = out.shape[:2]
        ctx, cfg, batch = self.ctx, self.config, inputs["batch"]

        def each(fn, what):  # a per-example task function of every copy's outputs, (C * N,)
            if inputs["shared"]:
                vals = _vmap(lambda o: fn(o, batch))(out)
            else:
                vals = fn(out.flatten(0, 1), flatten_batch(batch))
            return per_example(vals.reshape(-1), C * N, what)

        loss = each(ctx.task_loss, "loss")
        kw = {}
        if cfg.variant != "bootstrap":
            kw = dict(inputs["kw"], outputs=out.reshape(C * N, *out.shape[2:]))
            if cfg.variant == "trak":
                kw["f"] = each(ctx.task_output_function, "output_function")
        return perturbed_objective(cfg.variant, loss=loss, gamma=cfg.gamma, **kw).view(C, N)

    def _choose_layout(self, idx) -> str:
        """The layout of ``layout="auto"``, from the block's first step (deterministic, so a rerun gives the same
        copies bit for bit): the union unless it exceeds ``MAX_UNION_RATIO`` batches or the first trainable layer
        has at least ``GATHER_MIN_WIDTH`` outputs per copy."""
        C, B = idx.shape
        n_union = len(torch.unique(idx))
        width = self.forward.first_width()
        if n_union > MAX_UNION_RATIO * B:
            chosen, why = "gather", f"the union of {n_union} examples is over {MAX_UNION_RATIO:g} batches of {B}"
        elif width >= GATHER_MIN_WIDTH:
            chosen, why = "gather", (f"the first trainable layer has {width} outputs per copy (>= {GATHER_MIN_WIDTH}): "
                                     f"batched matmuls over each copy's {B} examples")
        else:
            chosen, why = "union", (f"the first trainable layer has {width} outputs per copy (< {GATHER_MIN_WIDTH}): "
                                    f"one matmul over the union of {n_union} examples")
        self.layout_report = dict(chosen=chosen, reason=why)
        return chosen

    # ------------------------------------------------------------------------------------- signals
    @torch.no_grad()
    def signals(self, stacked: list, dataset, signal=None) -> torch.Tensor:
        """Signals ``(C, n)`` (float64, CPU) of the C copies whose weights are ``stacked``, one shared-input pass
        per evaluation batch."""
        ctx = self.ctx
        ctx.model.train(False)
        n, C = len(dataset), stacked[0].shape[0]
        out = torch.empty(C, n, dtype=torch.float64)
        signal_fn = ctx.task_signal if signal is None else signal
        for idx in ctx.index_batches(n):
            batch = ctx.fetch(dataset, idx)
            outs = self.forward(stacked, batch[0])
            vals = _vmap(lambda o: signal_fn(o, batch))(outs)
            out[:, idx] = per_example(vals.reshape(-1), C * len(idx), "signal").view(C, -1).double().cpu()
        return out


__all__ = ["GATHER_MIN_WIDTH", "LAYOUTS", "MAX_UNION_RATIO", "SharedInputTrainer", "StackedForward", "check",
           "supported", "worthwhile"]

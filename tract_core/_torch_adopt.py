"""Which layer of a PyTorch model to wrap, and whether a layer can be wrapped.

The first layer is found from one example forward (the first leaf module with a weight or
a trainable parameter that it calls), not from attribute names; a subclass of a plain
layer is accepted only where its forward is provably the plain one.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch
from torch import nn

# Normalisations, with or without parameters: their output depends on statistics of the
# input (or on running ones), so the layer after them does not see the input itself.
NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
         nn.CrossMapLRN2d, *([nn.RMSNorm] if hasattr(nn, "RMSNorm") else []))
# What the TrAct forward reads from a layer: a subclass that defines one of these may
# compute another function than its base class.
FORWARD_READS = {"forward", "__call__", "_call_impl", "_wrapped_call_impl", "__getattr__",
                 "__getattribute__", "weight", "bias"}
CONV_READS = {"_conv_forward", "stride", "padding", "dilation", "groups", "padding_mode",
              "_reversed_padding_repeated_twice"}


def check_plain_forward(layer: nn.Module, base: type) -> None:
    """TypeError unless ``layer`` (an instance of ``base`` or of a subclass) computes exactly
    ``base``'s forward from its own weight Parameter, so that TrAct's gradient is for it."""
    name, kind = type(layer).__name__, "linear" if base is nn.Linear else "conv"
    if isinstance(layer, nn.modules.lazy.LazyModuleMixin) and layer.has_uninitialized_params():
        raise TypeError(f"{name} is a lazy layer with no weight shape yet: run one forward pass "
                        f"first, then wrap it")
    use_instead = (f"or call tract_core.torch.{kind} on the weight it computes, in your "
                   f"forward")
    if nn.utils.parametrize.is_parametrized(layer):
        raise TypeError(
            f"{name} is parametrized ({', '.join(layer.parametrizations)}; e.g. by "
            f"weight_norm or spectral_norm): its weight is a function of other parameters, and "
            f"TrAct's gradient is for the weight, not for its parametrization. Remove the "
            f"parametrization first (torch.nn.utils.parametrize.remove_parametrizations("
            f"layer, 'weight')), {use_instead}")
    own = layer._parameters
    if not isinstance(own.get("weight"), nn.Parameter) or "bias" not in own:
        raise TypeError(
            f"{name}'s weight or bias is no Parameter of its own but computed by a forward "
            f"pre-hook from {', '.join(own)} (old-style weight_norm or spectral_norm, "
            f"pruning): TrAct's gradient is for the weight, not for what it is computed "
            f"from. Remove the hook first (e.g. torch.nn.utils.remove_weight_norm), "
            f"{use_instead}")
    reads = FORWARD_READS | (CONV_READS if kind == "conv" else set())
    # On the instance, only methods replace the class's (its attributes are the layer's own).
    methods = {"forward", "_conv_forward", "_call_impl", "_wrapped_call_impl"}
    definers = [("the layer itself", methods & set(vars(layer)))] + [
        (f"its class {c.__module__}.{c.__qualname__}", vars(c))
        for c in type(layer).__mro__ if c not in base.__mro__]
    for where, names in definers:
        if defined := sorted(reads & set(names)):
            raise TypeError(
                f"{name}'s forward may differ from nn.{base.__name__}'s: "
                f"{where} defines {', '.join(defined)}, so TrAct's weight gradient (made "
                f"for nn.{base.__name__}'s forward) would be for a different function. Wrap "
                f"a plain nn.{base.__name__}, {use_instead} (e.g. the standardized weight "
                f"of a weight-standardized conv)")


class _Found(Exception):
    """Ends the example forward at the first layer."""


def _is_candidate(module):
    """A leaf module that is a normalisation, has a weight or a trainable parameter: not
    preprocessing such as a mean and std held as frozen Parameters."""
    own = module._parameters
    return next(module.children(), None) is None and (
        isinstance(module, NORMS) or own.get("weight") is not None
        or any(p is not None and p.requires_grad for p in own.values()))


def _leaf_calls(model, example_input):
    """[(path, module)] of the candidates one forward of ``example_input`` calls, in call
    order, up to the first that is no normalisation. In eval mode and without gradients,
    so that no running statistics change; every module's mode is restored."""
    called = []

    def record(path, module, args):
        called.append((path, module))
        if not isinstance(module, NORMS):
            raise _Found

    handles = [module.register_forward_pre_hook(functools.partial(record, path))
               for path, module in model.named_modules() if _is_candidate(module)]
    modes = [(module, module.training) for module in model.modules()]
    if isinstance(example_input, Mapping):
        args, kwargs = (), dict(example_input)
    else:
        args = example_input if isinstance(example_input, tuple) else (example_input,)
        kwargs = {}
    try:
        model.train(False)
        with torch.no_grad():
            model(*args, **kwargs)
    except _Found:
        pass
    finally:
        for handle in handles:
            handle.remove()
        for module, training in modes:
            module.training = training
    return called


def configured_first_conv(model: nn.Module) -> str | None:
    """timm's ``pretrained_cfg['first_conv']`` (or ``default_cfg``'s), checked to name a
    submodule; None where the model has none."""
    for attribute in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attribute, None)
        path = (cfg.get("first_conv") if isinstance(cfg, Mapping)
                else getattr(cfg, "first_conv", None))
        if path:
            break
    else:
        return None
    source = f"model.{attribute}['first_conv'] is {path!r}"
    if not isinstance(path, str):
        raise ValueError(f"{source}, not one dotted module path: wrap the layer with wrap()")
    try:
        model.get_submodule(path)
    except AttributeError:
        raise ValueError(f"{source}, which names no submodule of the model: wrap the layer "
                         f"with wrap()") from None
    return path


def first_layer(model: nn.Module, example_input: object) -> tuple[str, nn.Module]:
    """(dotted path, module) of the layer to wrap: timm's ``first_conv`` where the model
    has one, else the first leaf module with a weight or a trainable parameter that one
    forward of ``example_input`` calls. TypeError where a normalisation comes first,
    ValueError where there is no such layer or it is the model itself."""
    path = configured_first_conv(model)
    if path is None:
        if example_input is None:
            raise ValueError("example_input is required: the model has no "
                             "pretrained_cfg['first_conv'] that names its first layer")
        called = _leaf_calls(model, example_input)
        if not called:
            raise ValueError("the example forward called no module with a weight or a "
                             "trainable parameter: wrap the model's first layer with wrap()")
        path, module = called[0]
        if isinstance(module, NORMS):
            after = next((f" ({p!r}, {type(m).__name__})" for p, m in called
                          if not isinstance(m, NORMS)), "")
            raise TypeError(
                f"the input first reaches {path!r} ({type(module).__name__}), a "
                f"normalisation: TrAct trains the first layer that consumes the "
                f"(standardized) input, and a normalisation before that layer changes what "
                f"it sees. To use TrAct on the layer after it{after} anyway, wrap that "
                f"layer explicitly with tract_core.torch.wrap")
    if not path:
        raise ValueError("the model is itself its first layer: use "
                         "tract_core.torch.wrap(model)")
    return path, model.get_submodule(path)


def replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Puts ``new`` in place of ``old`` at every path of ``model`` that holds it."""
    for path, module in list(model.named_modules(remove_duplicate=False)):
        if module is old:
            parent, _, name = path.rpartition(".")
            setattr(model.get_submodule(parent), name, new)

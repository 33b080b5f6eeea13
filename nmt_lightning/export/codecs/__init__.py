"""Codecs: how ``nmt-lightning export`` stores one tensor, and how loading gets it back.

A tensor is encoded by a chain of steps (``[{"codec": "int8", "bits": 8, ...}]``, in the
order the checkpoint's compression manifest gives). Each step maps a dict of named tensors
to another: the chain starts from ``{"": the trained weight}``; int8 turns that into
``{"": int8 values, "scale": scales}``; a later step (a sparse encoding, say) may take those
in turn. Decoding runs the steps backwards to a dense fp32 tensor. A codec may also deploy
an nn.Linear in a faster form than the dense weight (int8: ``Int8Linear``).

A new encoding is one file here that defines a ``Codec`` subclass and calls ``register``;
nothing else in the exporter changes.
"""

from __future__ import annotations

from typing import Callable, ClassVar, Mapping, Optional

import torch
from torch import nn

from nmt_lightning.errors import ModelFileError

Parts = dict[str, torch.Tensor]  # "" is the main tensor; other keys are its side tensors (scales, masks, ...)


class Codec:
    """One encoding step. Subclasses set ``name`` and implement ``encode`` / ``decode``.

    ``quantizes``: the step rounds values (``export --quantize fp32`` drops such steps).
    ``runtime_options``: spec fields that name a state_dict tensor the runtime needs (int8:
    the activation range of the layer's input); the exporter stores each one beside the
    weight, as ``<weight name>.<field>``, and two uses of one tied tensor may differ in them.
    ``state_inputs``: spec fields that name a state_dict tensor the encoder needs (iPQ: the
    trained codebook and assignments); the exporter passes each as ``parts[field]`` to
    ``encode``. They belong to the weight, so they do not tell two encodings apart.
    """

    name: ClassVar[str]
    quantizes: ClassVar[bool] = False
    runtime_options: ClassVar[tuple[str, ...]] = ()
    state_inputs: ClassVar[tuple[str, ...]] = ()
    quantizes_inputs: ClassVar[bool] = False  # its runtime layer quantizes activations (static or dynamic)

    def encode(self, parts: Parts, spec: Mapping) -> Parts:
        raise NotImplementedError

    def decode(self, parts: Parts, spec: Mapping) -> Parts:
        raise NotImplementedError

    def runtime_linear(self, parts: Parts, spec: Mapping, bias: Optional[torch.Tensor],
                       options: Mapping[str, torch.Tensor]) -> Optional[nn.Module]:
        """An nn.Module computing ``x -> x W^T + b`` from the encoded parts, or None (use the dense weight)."""
        return None


CODECS: dict[str, Codec] = {}


def register(codec: Codec) -> Codec:
    CODECS[codec.name] = codec
    return codec


def codec(name: str) -> Codec:
    if name not in CODECS:
        raise ModelFileError(f"codec '{name}' is not known to this version of nmt-lightning (known: {sorted(CODECS)})")
    return CODECS[name]


def encoding_spec(spec: Mapping) -> dict:
    """The fields of a step that decide the stored bits (without order, runtime options and the
    names of its state inputs)."""
    step_codec = codec(spec["codec"])
    left_out = {"order", *step_codec.runtime_options, *step_codec.state_inputs}
    return {key: value for key, value in spec.items() if key not in left_out}


def encode_chain(tensor: torch.Tensor, steps: list[Mapping],
                 state: Optional[Callable[[str], torch.Tensor]] = None) -> Parts:
    """Encode ``tensor`` step by step; ``state(key)`` returns the checkpoint tensor a step's
    ``state_inputs`` field names."""
    parts: Parts = {"": tensor.detach().float().contiguous()}
    for step in steps:
        step_codec = codec(step["codec"])
        if step_codec.state_inputs and state is None:
            raise ValueError(f"codec '{step_codec.name}' encodes from checkpoint tensors; none were given")
        inputs = {field: state(step[field]) for field in step_codec.state_inputs}
        parts = step_codec.encode({**parts, **inputs}, step)
    return parts


def decode_chain(parts: Parts, steps: list[Mapping]) -> torch.Tensor:
    """The dense fp32 tensor of an encoded one."""
    for step in reversed(steps):
        parts = codec(step["codec"]).decode(parts, step)
    return parts[""].float()


def runtime_linear(parts: Parts, steps: list[Mapping], bias: Optional[torch.Tensor],
                   options: Mapping[str, torch.Tensor]) -> Optional[nn.Module]:
    """The first codec, from the outermost step in, that deploys the layer itself; None: dense."""
    for index in range(len(steps) - 1, -1, -1):
        step = steps[index]
        module = codec(step["codec"]).runtime_linear(parts, step, bias, options)
        if module is not None:
            return module
        parts = codec(step["codec"]).decode(parts, step)
    return None


# The codecs this package ships (each registers itself).
from nmt_lightning.export.codecs import affine8, int4, int8, ipq, sparse  # noqa: E402,F401

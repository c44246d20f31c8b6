"""The one schema of SPARTHA's architecture hyperparameters.

:class:`ModelConfig` holds every architecture hyperparameter with its default, written once
here. :class:`~spartha_pyro.SPARTHA` builds it from its keyword arguments,
:class:`~spartha_pyro.module.SparthaModule` and :class:`~spartha_pyro.models.SparthaModel` are
built from it, ``settings.json`` saves its :func:`~dataclasses.asdict` (under
``"init_kwargs"``), and ``spartha train`` generates its ``model`` options from its fields.
A new knob is one field here (with its ``help``) plus the code that uses it.
"""
from __future__ import annotations

import textwrap
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from ._errors import InputError

#: kinds of latent a classifier weight ``alpha`` applies to: label (``y``), batch (``d``), artifact (``r``)
AUX_KINDS = ("y", "d", "r")


def _aux_default() -> dict[str, float]:
    return {kind: 50.0 for kind in AUX_KINDS}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyperparameters of SPARTHA (each field's meaning is its ``help``).

    Construction validates the values (:class:`~spartha_pyro.InputError`) and completes a
    partial ``aux_weights`` with the defaults, so ``ModelConfig(**saved)`` also reads the
    ``init_kwargs`` of models saved before a field existed.
    """

    artifact_latent: bool = field(
        default=True, metadata={"help": "model the artifact latent Z_r and its classifier (off: the SpatialDIVA ablation)"}
    )
    likelihood: str = field(default="nb", metadata={"help": "count likelihood", "choices": ("nb", "zinb")})
    y_dim: int = field(default=16, metadata={"help": "width of each label latent Z_y"})
    d_dim: int = field(default=8, metadata={"help": "width of the batch latent Z_d"})
    r_dim: int = field(default=8, metadata={"help": "width of the artifact latent Z_r"})
    x_dim: int = field(default=8, metadata={"help": "width of the free residual latent Z_x (0 drops it)"})
    hidden: int = field(default=256, metadata={"help": "hidden width of decoder and encoders"})
    aux_weights: Mapping[str, float] = field(
        default_factory=_aux_default,
        metadata={"help": "weights alpha of the classifier factors q(L | Z) per kind of latent: y (labels), "
                          "d (batch), r (artifact); kinds not given keep their default"},
    )
    histology_weight: float = field(default=1.0, metadata={"help": "weight lambda_h of the histology-only ELBO"})
    histology_encoder: str = field(
        default="mlp", metadata={"help": "histology-only encoder (linear: ridge-like)", "choices": ("mlp", "linear")}
    )
    histology_dropout: float = field(default=0.2, metadata={"help": "input dropout of the histology encoder"})

    def __post_init__(self):
        unknown = sorted(set(self.aux_weights) - set(AUX_KINDS))
        if unknown:
            raise InputError(f"aux_weights keys must be among {AUX_KINDS}, got {unknown}")
        object.__setattr__(self, "aux_weights", {**_aux_default(), **{k: float(v) for k, v in self.aux_weights.items()}})
        for f in fields(self):
            choices = f.metadata.get("choices")
            if choices is not None and getattr(self, f.name) not in choices:
                raise InputError(f"{f.name} must be one of {choices}, got {getattr(self, f.name)!r}")
        if min(self.y_dim, self.d_dim, self.r_dim, self.hidden) < 1 or self.x_dim < 0:
            raise InputError("y_dim, d_dim, r_dim and hidden must be positive and x_dim non-negative")
        if not 0.0 <= self.histology_dropout < 1.0:
            raise InputError(f"histology_dropout must be in [0, 1), got {self.histology_dropout}")

    @classmethod
    def from_kwargs(cls, kwargs: Mapping[str, object]) -> "ModelConfig":
        """The config of keyword arguments, naming any that are not fields (:class:`~spartha_pyro.InputError`)."""
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise InputError(f"unknown model setting(s) {unknown}; the settings are {names}")
        return cls(**kwargs)

    def to_dict(self) -> dict:
        """JSON-serialisable fields (``settings.json``'s ``init_kwargs``)."""
        return asdict(self)

    @classmethod
    def describe(cls, indent: str = "", width: int = 92) -> str:
        """Numpydoc-style entries ``name : type = default`` + help, one per field (for docstrings)."""
        entries = []
        for f in fields(cls):
            default = f.default_factory() if callable(f.default_factory) else f.default
            kind = "{" + ", ".join(map(repr, f.metadata["choices"])) + "}" if "choices" in f.metadata else f.type
            text = f.metadata["help"][0].upper() + f.metadata["help"][1:] + "."
            body = textwrap.fill(text, width, initial_indent=indent + "    ", subsequent_indent=indent + "    ")
            entries.append(f"{indent}{f.name} : {kind} = {default!r}\n{body}")
        return "\n".join(entries)

"""``geocap import-ort``: convert an original ORT checkpoint (Herdade et al.'s
``RelationTransformerModel``) into a geocap checkpoint.

ORT leaves two files: ``model.pth`` (``torch.save`` of the model's state dict) and
``infos_<id>.pkl`` (a pickle of a dict whose ``opt`` is the training run's argparse.Namespace and
whose ``vocab`` is ``ix_to_word``, ``{"1": word, ...}``).

Safety: neither file can run code. ``model.pth`` is read with ``torch.load(weights_only=True)``;
the pickle with :class:`RestrictedUnpickler`, which resolves only ``argparse.Namespace`` and the
plain containers (dict, list, tuple, set, frozenset, OrderedDict). Any other global a pickle names
(``os.system``, ``builtins.open``, ``numpy`` scalars, ...) is never imported or called: it turns
into an inert :class:`RefusedGlobal` placeholder. A placeholder where the importer needs data
(the whole file, ``opt`` and the fields it reads, ``vocab``) is an error naming the file and the
refused global; elsewhere (e.g. ``best_val_score``, a numpy float in real ORT runs) it is ignored
and listed in the checkpoint's ``extra["imported_from"]["ignored_globals"]``.

The conversion (every name and shape checked; see the table in :mod:`geocap.model.transformer`):

* hyper-parameters from ``opt``: ``num_layers``, ``input_encoding_size`` (d_model), ``rnn_size``
  (d_ff), ``att_feat_size``, ``use_bn`` (0 or 1; 2 is refused: its BatchNorm after the ReLU has
  no counterpart here), ``legacy_extra_skip``, ``box_trignometric_embedding`` (must be true),
  heads ``num_heads``/``h`` when present, else ORT's fixed 8. (``legacy_extra_skip`` absent means
  off, as in ORT's code; checkpoints of ORT code older than the option had it on: override with
  ``legacy_extra_skip=True`` / ``--legacy-extra-skip 1``.) Dropout is ORT's 0.1 (its
  ``make_model`` passes no dropout, so every transformer dropout is 0.1; ``drop_prob_lm`` only
  drives the dropout after ``att_embed``), overridable with ``dropout=``.
* ``use_bn=1``: ORT's eval-mode ``BatchNorm1d`` (``att_embed.0``, eps 1e-5) is folded exactly
  into the following Linear (``att_embed.1``) in float64:
  ``W' = W diag(s)``, ``b' = b + W (beta - s * running_mean)``, ``s = gamma / sqrt(running_var + eps)``.
* vocabulary: V = ``len(ix_to_word) + 1``; id 0 is ORT's start, end and padding at once (named
  ``<eos>`` here; ``pad_id = bos_id = eos_id = 0``), word ``i`` keeps ORT's id ``i``; ``unk_id`` is
  the id of ORT's ordinary word ``UNK`` when present (what its preprocessing maps rare words to),
  else None.
* ``model.tgt_embed.1.pe`` (the sinusoid table, recomputed here) and BatchNorm's
  ``num_batches_tracked`` are ignored; every other key must be expected and of the expected
  shape. A state dict saved from a ``DataParallel`` wrapper (``module.`` prefix) is accepted.

Behaviour: ORT and the imported model give the same log-probabilities wherever ORT's do not
depend on what follows a caption's end (ORT also masks padding tokens as decoder keys, which
changes only positions after the end; see ``tests/test_ort_import.py`` for the measured error).
"""
from __future__ import annotations

import argparse
import collections
import io
import os
import pickle
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from geocap.captioner import Captioner
from geocap.checkpoint import file_sha256, load_error_detail, save_checkpoint
from geocap.data.readers.ort import _vocabulary as ort_word_list
from geocap.data.items import DataError
from geocap.data.vocab import Vocabulary
from geocap.errors import CheckpointError
from geocap.model import ObjectRelationTransformer, ORTConfig

__all__ = ["OrtImportError", "RefusedGlobal", "RestrictedUnpickler", "OrtInfos", "read_ort_infos",
           "load_ort_state", "ort_vocabulary", "ort_config", "convert_ort_state", "import_ort",
           "END_WORD"]

END_WORD = "<eos>"          # our name for ORT's id 0 (start, end and padding)
ORT_HEADS = 8               # h in ORT's make_model (not an option there)
ORT_DROPOUT = 0.1           # ORT's make_model default, used by every transformer dropout
BATCH_NORM_EPS = 1e-5       # torch.nn.BatchNorm1d's default, which ORT keeps
DIM_G = 64                  # ORT's trigonometric box embedding


class OrtImportError(CheckpointError):
    """An ORT checkpoint that cannot be imported; the message names the file and the problem."""


# -- the restricted unpickler -----------------------------------------------------------------
class RefusedGlobal:
    """Inert stand-in for a global a pickle names but :class:`RestrictedUnpickler` does not admit.

    Calling it, ``__new__`` and ``__setstate__`` accept anything and do nothing, so the pickle's
    construction of the object runs no code; ``global_name`` says what was refused."""

    global_name = "?"

    def __new__(cls, *args, **kwargs):
        return object.__new__(cls)

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass

    def __repr__(self) -> str:
        return f"<refused global {self.global_name}>"


def _reconstructor(cls, base, state):
    """``copyreg._reconstructor`` (protocol 0/1 pickles, e.g. Python 2's cPickle) for
    ``argparse.Namespace`` only."""
    if cls is argparse.Namespace and base is object and state is None:
        return argparse.Namespace()
    raise pickle.UnpicklingError(f"copyreg._reconstructor is admitted for argparse.Namespace only, got {cls!r}")


class RestrictedUnpickler(pickle.Unpickler):
    """Resolves only ``argparse.Namespace``, the plain containers and (for protocol 0/1 pickles)
    a Namespace-only ``copyreg._reconstructor``; every other global becomes a :class:`RefusedGlobal`
    subclass named after it (recorded in ``refused``). Python 2 pickles are read with
    ``fix_imports`` and their byte strings decoded as UTF-8."""

    ADMITTED = {
        ("argparse", "Namespace"): argparse.Namespace,
        ("builtins", "dict"): dict, ("builtins", "list"): list, ("builtins", "tuple"): tuple,
        ("builtins", "set"): set, ("builtins", "frozenset"): frozenset, ("builtins", "object"): object,
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("copyreg", "_reconstructor"): _reconstructor,
    }

    def __init__(self, file):
        super().__init__(file, fix_imports=True, encoding="utf-8")
        self.refused: list[str] = []

    PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}

    def find_class(self, module: str, name: str):
        module = self.PY2_MODULES.get(module, module)
        admitted = self.ADMITTED.get((module, name))
        if admitted is not None:
            return admitted
        full = f"{module}.{name}"
        if full not in self.refused:
            self.refused.append(full)
        return type("RefusedGlobal", (RefusedGlobal,), {"global_name": full})

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("persistent ids are not admitted")


def _refused_name(value: Any) -> Optional[str]:
    """The refused global ``value`` stands for, if it is a placeholder object or the placeholder
    class itself (a global named but never called); else None."""
    if isinstance(value, RefusedGlobal) or (isinstance(value, type) and issubclass(value, RefusedGlobal)):
        return value.global_name
    return None


def _refused_in(value: Any, depth: int = 0) -> Optional[str]:
    """The name of the first refused global in ``value`` or inside it (containers and Namespaces searched)."""
    if _refused_name(value):
        return _refused_name(value)
    if depth > 20:
        return None
    if isinstance(value, argparse.Namespace):
        value = vars(value)
    if isinstance(value, dict):
        items = list(value.keys()) + list(value.values())
    elif isinstance(value, (list, tuple, set, frozenset)):
        items = list(value)
    else:
        return None
    for item in items:
        found = _refused_in(item, depth + 1)
        if found:
            return found
    return None


@dataclass
class OrtInfos:
    """What the importer takes from ``infos.pkl``: ``opt`` (the Namespace's attributes as a dict),
    ``ix_to_word`` (``{"1": word, ...}``) and the refused globals found elsewhere (ignored)."""

    path: str
    opt: dict
    ix_to_word: dict
    ignored_globals: list = field(default_factory=list)


def read_ort_infos(path) -> OrtInfos:
    """Read ORT's ``infos.pkl`` safely (:class:`RestrictedUnpickler`); OrtImportError naming the
    file for a missing/corrupt file, a refused global where data is needed, no ``opt`` or ``vocab``."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except OSError as err:
        raise OrtImportError(f"{path}: cannot read the ORT infos file ({err.strerror or err})") from None
    unpickler = RestrictedUnpickler(io.BytesIO(data))
    try:
        infos = unpickler.load()
    except Exception as err:  # noqa: BLE001 - any failure of a (restricted) unpickler means "corrupt"
        raise OrtImportError(f"{path}: not a readable ORT infos pickle ({type(err).__name__}: {err})") from None
    if _refused_name(infos):
        raise OrtImportError(f"{path}: the pickle is a {_refused_name(infos)} object, a global this importer never "
                             f"loads (it was not run); an ORT infos file is a dict")
    if not isinstance(infos, dict):
        raise OrtImportError(f"{path}: an ORT infos file is a dict, got {type(infos).__name__}")
    for key in ("opt", "vocab"):
        if key not in infos:
            raise OrtImportError(f"{path}: no {key!r} in the ORT infos (keys: {', '.join(map(str, list(infos)[:10]))})")
    for key in ("opt", "vocab"):
        refused = _refused_in(infos[key])
        if refused:
            raise OrtImportError(f"{path}: infos[{key!r}] holds a {refused} object, a global this importer never "
                                 f"loads (it was not run); only argparse.Namespace and plain containers are admitted")
    opt = infos["opt"]
    if isinstance(opt, argparse.Namespace):
        opt = dict(vars(opt))
    if not isinstance(opt, dict):
        raise OrtImportError(f"{path}: infos['opt'] must be an argparse.Namespace (or dict), got {type(opt).__name__}")
    vocab = infos["vocab"]
    if not isinstance(vocab, dict):
        raise OrtImportError(f"{path}: infos['vocab'] must be ORT's ix_to_word dict, got {type(vocab).__name__}")
    return OrtInfos(path, opt, vocab, list(unpickler.refused))


# -- model.pth --------------------------------------------------------------------------------
def load_ort_state(path) -> dict:
    """ORT's state dict from ``model.pth`` (``torch.load(weights_only=True)``, on the CPU), with a
    ``DataParallel`` ``module.`` prefix removed; OrtImportError naming the file otherwise."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise OrtImportError(f"{path}: no such ORT model file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - every failure of the restricted loader means "not loadable"
        raise OrtImportError(f"{path}: not a loadable ORT model file: corrupt, truncated, or holding objects other "
                             f"than tensors, which are never unpickled ({type(err).__name__}: "
                             f"{load_error_detail(err)})") from None
    if not isinstance(state, dict) or not state:
        raise OrtImportError(f"{path}: an ORT model file is a state dict of tensors, got {type(state).__name__}")
    if "format" in state and not isinstance(state.get("format"), torch.Tensor):
        raise OrtImportError(f"{path}: not an ORT state dict (it is a {state['format']!r} file)")
    bad = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise OrtImportError(f"{path}: an ORT model file is a state dict of tensors; {bad[0]!r} is not a tensor")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


# -- vocabulary and hyper-parameters -----------------------------------------------------------
def ort_vocabulary(ix_to_word: dict, path: str = "infos.pkl") -> Vocabulary:
    """geocap's Vocabulary of ORT's ``ix_to_word`` (keys ``"1".."V"``): ``[END_WORD] + words``,
    ``pad_id = bos_id = eos_id = 0``, ``unk_id`` the id of "UNK" when present (else None)."""
    try:
        words = ort_word_list(f"{path}: infos['vocab']", ix_to_word)
    except DataError as err:
        raise OrtImportError(str(err)) from None
    bad = [w for w in words if not isinstance(w, str) or not w]
    if bad:
        raise OrtImportError(f"{path}: infos['vocab'] holds a word that is not a non-empty string: {bad[0]!r}")
    if END_WORD in words:
        raise OrtImportError(f"{path}: the ORT vocabulary has the word {END_WORD!r}, the name kept for its id 0")
    try:
        unk = words.index("UNK") + 1 if "UNK" in words else None
        return Vocabulary([END_WORD] + words, pad_id=0, bos_id=0, eos_id=0, unk_id=unk)
    except ValueError as err:
        raise OrtImportError(f"{path}: infos['vocab']: {err}") from None


def _opt_value(opt: dict, name: str, kind: str, path: str, default: Any = None, required: bool = True):
    if name not in opt or opt[name] is None:
        if required:
            raise OrtImportError(f"{path}: infos['opt'] has no {name!r}")
        return default
    value = opt[name]
    if kind == "bool":
        ok = isinstance(value, bool) or (isinstance(value, int) and value in (0, 1))
    else:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise OrtImportError(f"{path}: infos['opt'].{name} must be {'an int' if kind == 'int' else 'a bool'}, "
                             f"got {value!r}")
    return value


def ort_config(opt: dict, vocab_size: int, path: str = "infos.pkl", *, max_len: int = 5000,
               dropout: Optional[float] = None, legacy_extra_skip: Optional[bool] = None) -> tuple[ORTConfig, int]:
    """``(ORTConfig, use_bn)`` from ORT's ``opt`` (see the module doc) for ``vocab_size`` ids;
    ``legacy_extra_skip`` None: ``opt.legacy_extra_skip``, False when absent (as ORT's code)."""
    use_bn = _opt_value(opt, "use_bn", "int", path, 0, required=False)
    if use_bn == 2:
        raise OrtImportError(f"{path}: infos['opt'].use_bn = 2 (a BatchNorm1d after att_embed's ReLU) cannot be "
                             f"imported: geocap's feature embedding is Linear + ReLU only, and that BatchNorm "
                             f"does not fold into the following layers exactly")
    if use_bn not in (0, 1):
        raise OrtImportError(f"{path}: infos['opt'].use_bn must be 0, 1 or 2, got {use_bn!r}")
    if not _opt_value(opt, "box_trignometric_embedding", "bool", path, True, required=False):
        raise OrtImportError(f"{path}: infos['opt'].box_trignometric_embedding is false (a 4-d box embedding): "
                             f"geocap implements ORT's trigonometric 64-d box embedding only")
    heads = _opt_value(opt, "num_heads", "int", path, None, required=False)
    heads = _opt_value(opt, "h", "int", path, ORT_HEADS, required=False) if heads is None else heads
    ort_vocab = _opt_value(opt, "vocab_size", "int", path, None, required=False)
    if ort_vocab is not None and ort_vocab + 1 != vocab_size:
        raise OrtImportError(f"{path}: infos['opt'].vocab_size = {ort_vocab} but infos['vocab'] has "
                             f"{vocab_size - 1} words")
    try:
        config = ORTConfig(
            vocab_size=vocab_size,
            feature_dim=_opt_value(opt, "att_feat_size", "int", path),
            layers=_opt_value(opt, "num_layers", "int", path),
            d_model=_opt_value(opt, "input_encoding_size", "int", path),
            heads=heads,
            d_ff=_opt_value(opt, "rnn_size", "int", path),
            dropout=ORT_DROPOUT if dropout is None else dropout,
            geometry=True,
            embedding="ort",  # ORT's own box embedding (|offset| between centres), whatever the default
            legacy_extra_skip=bool(_opt_value(opt, "legacy_extra_skip", "bool", path, False, required=False)
                                   if legacy_extra_skip is None else legacy_extra_skip),
            max_len=max_len, pad_id=0, bos_id=0, eos_id=0)
    except ValueError as err:
        raise OrtImportError(f"{path}: infos['opt'] gives an invalid model: {err}") from None
    return config, int(use_bn)


# -- the state dict ---------------------------------------------------------------------------
def _name_map(config: ORTConfig) -> dict:
    """``{ORT key: geocap key}`` for the keys copied one to one (att_embed and WGs apart)."""
    names = {}

    def linear(ort, ours):
        names[ort + ".weight"], names[ort + ".bias"] = ours + ".weight", ours + ".bias"

    def norm(ort, ours):
        names[ort + ".a_2"], names[ort + ".b_2"] = ours + ".a_2", ours + ".b_2"

    def attn(ort, ours):
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj", "out_proj")):
            linear(f"{ort}.linears.{j}", f"{ours}.{proj}")

    for i in range(config.layers):
        e, g = f"model.encoder.layers.{i}", f"encoder.layers.{i}"
        attn(e + ".self_attn", g + ".self_attn")
        norm(e + ".sublayer.0.norm", g + ".attn_norm")
        norm(e + ".sublayer.1.norm", g + ".ff_norm")
        linear(e + ".feed_forward.w_1", g + ".feed_forward.w_1")
        linear(e + ".feed_forward.w_2", g + ".feed_forward.w_2")
        d, g = f"model.decoder.layers.{i}", f"decoder.layers.{i}"
        attn(d + ".self_attn", g + ".self_attn")
        attn(d + ".src_attn", g + ".cross_attn")
        norm(d + ".sublayer.0.norm", g + ".self_norm")
        norm(d + ".sublayer.1.norm", g + ".cross_norm")
        norm(d + ".sublayer.2.norm", g + ".ff_norm")
        linear(d + ".feed_forward.w_1", g + ".feed_forward.w_1")
        linear(d + ".feed_forward.w_2", g + ".feed_forward.w_2")
    norm("model.encoder.norm", "encoder.norm")
    norm("model.decoder.norm", "decoder.norm")
    names["model.tgt_embed.0.lut.weight"] = "word_embed.weight"
    linear("model.generator.proj", "generator")
    return names


def _expected_ort_shapes(config: ORTConfig, use_bn: int) -> dict:
    """``{ORT key: shape}`` of every parameter/buffer an ORT model of ``config`` saves (the
    ignored ``tgt_embed.1.pe`` and ``num_batches_tracked`` apart)."""
    d, f = config.d_model, config.feature_dim
    with torch.device("meta"):
        ours = ObjectRelationTransformer(config).state_dict()
    shapes = {ort: tuple(ours[g].shape) for ort, g in _name_map(config).items()}
    for i in range(config.layers):
        for h in range(config.heads):
            shapes[f"model.encoder.layers.{i}.self_attn.WGs.{h}.weight"] = (1, DIM_G)
            shapes[f"model.encoder.layers.{i}.self_attn.WGs.{h}.bias"] = (1,)
    lin = "att_embed.1" if use_bn else "att_embed.0"
    shapes[lin + ".weight"], shapes[lin + ".bias"] = (d, f), (d,)
    if use_bn:
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"att_embed.0.{name}"] = (f,)
    return shapes


def _ignored(key: str) -> bool:
    return key == "model.tgt_embed.1.pe" or key.endswith(".num_batches_tracked")


def convert_ort_state(state: dict, config: ORTConfig, use_bn: int, path: str = "model.pth") -> dict:
    """geocap's state dict (float32) for ``ObjectRelationTransformer(config)`` from ORT's
    ``state``; OrtImportError naming the first missing, unexpected or mis-shaped key."""
    expected = _expected_ort_shapes(config, use_bn)
    missing = [k for k in expected if k not in state]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise OrtImportError(f"{path}: missing key {missing[0]}{more}; infos['opt'] describes an ORT model with "
                             f"{config.layers} layers, {config.heads} heads, use_bn={use_bn}")
    unexpected = [k for k in state if k not in expected and not _ignored(k)]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise OrtImportError(f"{path}: unexpected key {unexpected[0]}{more}; infos['opt'] describes an ORT model "
                             f"with {config.layers} layers, {config.heads} heads, use_bn={use_bn}")
    for key, shape in expected.items():
        tensor = state[key]
        if tuple(tensor.shape) != shape:
            raise OrtImportError(f"{path}: {key} has shape {tuple(tensor.shape)}, expected {shape} from infos['opt']")
        if not tensor.is_floating_point():
            raise OrtImportError(f"{path}: {key} has dtype {tensor.dtype}, expected floating point")
        if not bool(torch.isfinite(tensor).all()):
            raise OrtImportError(f"{path}: {key} holds NaN or infinite values")

    out = {ours: state[ort].float().clone() for ort, ours in _name_map(config).items()}
    for i in range(config.layers):
        pre = f"model.encoder.layers.{i}.self_attn.WGs"
        out[f"encoder.layers.{i}.self_attn.wg_weight"] = torch.stack(
            [state[f"{pre}.{h}.weight"][0] for h in range(config.heads)]).float()
        out[f"encoder.layers.{i}.self_attn.wg_bias"] = torch.stack(
            [state[f"{pre}.{h}.bias"][0] for h in range(config.heads)]).float()
    if use_bn:
        weight, bias = state["att_embed.1.weight"].double(), state["att_embed.1.bias"].double()
        var = state["att_embed.0.running_var"].double()
        if bool((var < 0).any()):
            raise OrtImportError(f"{path}: att_embed.0.running_var holds negative variances")
        scale = state["att_embed.0.weight"].double() / torch.sqrt(var + BATCH_NORM_EPS)
        shift = state["att_embed.0.bias"].double() - scale * state["att_embed.0.running_mean"].double()
        out["feature_embed.0.weight"] = (weight * scale[None, :]).float()
        out["feature_embed.0.bias"] = (bias + weight @ shift).float()
    else:
        out["feature_embed.0.weight"] = state["att_embed.0.weight"].float().clone()
        out["feature_embed.0.bias"] = state["att_embed.0.bias"].float().clone()
    return out


# -- the whole import -------------------------------------------------------------------------
def import_ort(model_pth, infos_pkl, out=None, *, max_len: int = 5000, dropout: Optional[float] = None,
               legacy_extra_skip: Optional[bool] = None):
    """Convert ORT's ``model_pth`` + ``infos_pkl`` into a :class:`~geocap.captioner.Captioner`
    (eval mode, CPU); when ``out`` is given, also save it there as a geocap checkpoint (atomically,
    nothing written on any error), its ``extra["imported_from"]`` naming the source files, their
    SHA-256 and the ORT options used. ``max_len``: positions of the sinusoid table (ORT's 5000);
    ``dropout``: for fine-tuning (default ORT's 0.1); ``legacy_extra_skip``: overrides the
    option (None: ``opt.legacy_extra_skip``, False when absent, as ORT's code reads it; ORT code
    older than that option always applied the skip, so its checkpoints need True). The weights
    cannot tell: both settings have the same parameters. Raises :class:`OrtImportError`."""
    model_pth, infos_pkl = os.fspath(model_pth), os.fspath(infos_pkl)
    infos = read_ort_infos(infos_pkl)
    vocab = ort_vocabulary(infos.ix_to_word, infos_pkl)
    config, use_bn = ort_config(infos.opt, len(vocab), infos_pkl, max_len=max_len, dropout=dropout,
                                legacy_extra_skip=legacy_extra_skip)
    state = load_ort_state(model_pth)
    converted = convert_ort_state(state, config, use_bn, model_pth)
    model = ObjectRelationTransformer(config)
    model.load_state_dict(converted, strict=True)
    captioner = Captioner(model.eval(), vocab)
    if out is not None:
        used = ("num_layers", "input_encoding_size", "rnn_size", "att_feat_size", "use_bn", "legacy_extra_skip",
                "drop_prob_lm", "seq_length", "vocab_size", "box_trignometric_embedding", "num_heads", "h",
                "norm_att_feat", "norm_box_feat")
        opt = {k: infos.opt[k] for k in used if isinstance(infos.opt.get(k), (int, float, bool, str))}
        extra = {"imported_from": {
            "format": "ort", "model": os.path.basename(model_pth), "model_sha256": file_sha256(model_pth),
            "infos": os.path.basename(infos_pkl), "infos_sha256": file_sha256(infos_pkl),
            "opt": opt, "ignored_globals": list(infos.ignored_globals)}}
        out = os.fspath(out)
        if os.path.dirname(out):
            os.makedirs(os.path.dirname(out), exist_ok=True)
        save_checkpoint(out, model=model, config=config, vocab=vocab, rng=False, extra=extra)
    return captioner

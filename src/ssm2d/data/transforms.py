"""Train and eval image transforms: torchvision's geometry and AutoAugment, timm's RandAugment,
AugMix and RandomErasing, for grayscale and RGB images alike."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from PIL import Image, ImageOps
from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
from timm.data.random_erasing import RandomErasing
from timm.data.transforms import str_to_pil_interp
from torchvision import transforms as T
from torchvision.transforms import AutoAugmentPolicy, InterpolationMode

from ..errors import ConfigError
from .base import DatasetInfo, to_size

__all__ = ["AUTO_AUGMENT_POLICIES", "INTERPOLATIONS", "RE_MODES", "TIMM_AUTO_AUGMENT", "build_transform"]

INTERPOLATIONS = ("bicubic", "bilinear", "nearest")
RE_MODES = ("pixel", "rand", "const")  # timm's RandomErasing: per-pixel normal noise, per-channel, zeros
AUTO_AUGMENT_POLICIES = tuple(policy.value for policy in AutoAugmentPolicy)  # torchvision: imagenet, cifar10, svhn
# First "-"-separated part of a timm augmentation string, e.g. "rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2",
# "original-mstd0.5", "v0".
TIMM_AUTO_AUGMENT = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")
_AUTO_AUGMENT_HELP = (
    f"torchvision's AutoAugment policy {' / '.join(AUTO_AUGMENT_POLICIES)}, or a timm string starting with "
    f"{' / '.join(TIMM_AUTO_AUGMENT)} (e.g. rand-m9-mstd0.5-inc1, augmix-m5-w4-d2)"
)


def _posterize(img: Image.Image, bits_to_keep: int, **_op_kwargs: object) -> Image.Image:
    """Keep the `bits_to_keep` high bits of every pixel value; 0 or fewer bits give a black image.

    Stands in for timm's posterize, which passes 0 bits on to PIL at the strongest magnitudes
    (timm's "v0" policy notes the black image that results); recent Pillow rejects bits outside
    1..8. `_op_kwargs` receives the fill colour and resampling timm passes to every operation.
    """
    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def _use_own_posterize(augment: Callable) -> Callable:
    """Swap `_posterize` into the Posterize operations of a timm RandAugment, AugMixAugment or AutoAugment."""
    ops = augment.ops if hasattr(augment, "ops") else [op for sub_policy in augment.policy for op in sub_policy]
    for op in ops:
        if op.name.startswith("Posterize"):
            op.aug_fn = _posterize
    return augment


def _auto_augment(spec: str, info: DatasetInfo, size: tuple[int, int], interpolation: str) -> Callable:
    # Geometric operations fill uncovered pixels with the data set's mean colour; a 1-channel
    # image needs a 1-value fill (PIL rejects a colour triple on a mode "L" image).
    fill = tuple(round(255 * m) for m in info.mean)
    if spec in AUTO_AUGMENT_POLICIES:
        return T.AutoAugment(AutoAugmentPolicy(spec), interpolation=InterpolationMode(interpolation), fill=list(fill))
    kind = spec.split("-")[0]
    if kind not in TIMM_AUTO_AUGMENT:
        raise ConfigError(f"auto_augment: expected {_AUTO_AUGMENT_HELP}, got {spec!r}")
    hparams = dict(
        translate_const=int(min(size) * 0.45),  # timm's default (timm.data.create_transform)
        img_mean=fill[0] if len(fill) == 1 else fill,
        interpolation=str_to_pil_interp(interpolation),
    )
    build = {"rand": rand_augment_transform, "augmix": augment_and_mix_transform}.get(kind, auto_augment_transform)
    try:
        augment = build(spec, hparams)
    except (AssertionError, ValueError, KeyError) as e:  # timm's parsers reject bad strings this way
        raise ConfigError(f"auto_augment: {spec!r} is not a valid timm augmentation string ({e})") from e
    return _use_own_posterize(augment)


def build_transform(
    info: DatasetInfo,
    train: bool,
    img_size: int | Sequence[int] | None = None,
    *,
    crop_padding: int = 0,
    hflip: float = 0.0,
    auto_augment: str | None = None,
    re_prob: float = 0.0,
    re_mode: str = "pixel",
    interpolation: str = "bicubic",
) -> T.Compose:
    """The transform from a data set's PIL image to a normalized (in_chans, H, W) float tensor.

    Eval: resize to `img_size` when it differs from the stored size (ImageFolder images: shorter
    side to max(H, W), then a center crop), ToTensor, Normalize(info.mean, info.std).
    Train, in this order: the same resize, or for ImageFolder images a RandomResizedCrop when
    `crop_padding` is 0; RandomCrop with zero padding; horizontal flip; auto-augmentation;
    ToTensor; Normalize; timm's RandomErasing.

    Args:
        info: the data set, from `dataset_info`.
        train: build the training transform; False builds the eval one, which takes no
            augmentation arguments.
        img_size: output size, N or (H, W); None means `info.img_size`.
        crop_padding: pixels of zero padding around a random crop of the output size
            (the small-data recipe's RandomCrop(pad 4)); 0 disables it.
        hflip: probability of a horizontal flip.
        auto_augment: None, torchvision's AutoAugment policy ("imagenet", "cifar10", "svhn"), or a
            timm string ("rand-m9-mstd0.5-inc1", "augmix-m5-w4-d2", "original-mstd0.5", ...).
        re_prob: probability of timm's RandomErasing, applied after Normalize.
        re_mode: what RandomErasing fills with: "pixel", "rand" or "const" (see timm).
        interpolation: "bicubic", "bilinear" or "nearest", for resizing and augmentation.

    Raises:
        ValueError: naming the argument that is out of range, unknown, or given for eval.
    """
    size = to_size(info.img_size if img_size is None else img_size, "img_size")
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation: expected one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
    if not isinstance(crop_padding, int) or crop_padding < 0:
        raise ValueError(f"crop_padding: expected an int >= 0, got {crop_padding!r}")
    for arg, p in (("hflip", hflip), ("re_prob", re_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{arg}: expected a probability in [0, 1], got {p!r}")
    if re_mode not in RE_MODES:
        raise ValueError(f"re_mode: expected one of {', '.join(RE_MODES)}, got {re_mode!r}")
    augmentation = dict(crop_padding=crop_padding, hflip=hflip, auto_augment=auto_augment, re_prob=re_prob)
    given = [arg for arg, value in augmentation.items() if value]
    if not train and given:
        raise ValueError(f"{', '.join(given)}: augmentation applies to train=True only, got it with train=False")
    interp = InterpolationMode(interpolation)

    ops: list[Callable] = []
    if info.native_size is None:  # images of varied sizes
        if train and not crop_padding:
            ops.append(T.RandomResizedCrop(size, interpolation=interp))
        else:
            ops += [T.Resize(max(size), interpolation=interp), T.CenterCrop(size)]
    elif size != info.native_size:
        ops.append(T.Resize(size, interpolation=interp))
    if crop_padding:
        ops.append(T.RandomCrop(size, padding=crop_padding, fill=0))
    if hflip:
        ops.append(T.RandomHorizontalFlip(hflip))
    if auto_augment:
        ops.append(_auto_augment(auto_augment, info, size, interpolation))
    ops += [T.ToTensor(), T.Normalize(info.mean, info.std)]
    if re_prob:
        ops.append(RandomErasing(re_prob, mode=re_mode, device="cpu"))
    return T.Compose(ops)

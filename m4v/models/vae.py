"""Causal 3D video VAE (paper Sec. 3.1: PyramidFlow's 8x8x8, 16-channel VAE; frames = 1 + 8k).

The autoencoder itself is diffusers' ``AutoencoderKLLTXVideo`` configured with ``patch_size=1`` and three
spatio-temporal down/up-sampling stages, causal in both encoder and decoder. We checked the alternatives in
diffusers 0.42: ``AutoencoderKLCogVideoX(temporal_compression_ratio=8)`` maps 121 frames to 16 latent frames
but decodes those 16 back to 128 frames (its temporal upsampler only keeps the first frame alone for an odd
frame count) and its GroupNorms mix statistics over time, so chunked decoding cannot be exact;
``AutoencoderKLCosmos`` has causal temporal attention (unbounded look-back). The LTX blocks use per-position
RMSNorm and causal convolutions only, so a video of ``1 + 8k`` frames maps to ``1 + k`` latent frames, the
first frame is encoded alone, and the encoder and decoder can be run chunk by chunk over time with the last
input frames of every causal convolution carried over (see ``_CausalStream``), which gives the same result as
one pass over the whole clip while holding only one chunk of activations.

Latent normalisation (PyramidFlow): the first latent frame is ``(z + 0.04) / 1.8726`` and every later one
``(z + 0.2343) / 3.0986``. The four numbers live in ``LatentNorm`` and are saved inside the diffusers
``config.json`` under the private key ``"_m4v_latent_norm"`` (diffusers keeps unknown ``_``-prefixed keys
through ``save_pretrained``/``from_pretrained`` without warnings), so the folder stays loadable by
``AutoencoderKLLTXVideo.from_pretrained`` alone.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from diffusers import AutoencoderKLLTXVideo
from diffusers.models.autoencoders.autoencoder_kl_ltx import LTXVideoCausalConv3d, LTXVideoUpsampler3d
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
from torch import Tensor, nn

NORM_CONFIG_KEY = "_m4v_latent_norm"
TEMPORAL_COMPRESSION = 8
SPATIAL_COMPRESSION = 8


@dataclasses.dataclass(frozen=True)
class LatentNorm:
    """Per-frame latent normalisation z' = (z + shift) / scale, first latent frame separate (PyramidFlow)."""

    first_shift: float = 0.04
    first_scale: float = 1.8726
    rest_shift: float = 0.2343
    rest_scale: float = 3.0986

    def _vectors(self, z: Tensor) -> tuple[Tensor, Tensor]:
        t = z.shape[2]
        shift = torch.full((t,), self.rest_shift, dtype=z.dtype, device=z.device)
        scale = torch.full((t,), self.rest_scale, dtype=z.dtype, device=z.device)
        shift[0], scale[0] = self.first_shift, self.first_scale
        return shift.view(1, 1, t, 1, 1), scale.view(1, 1, t, 1, 1)

    def normalize(self, z: Tensor) -> Tensor:
        """Raw VAE latents [B, C, T, h, w] (frame 0 is the first frame of the clip) -> diffusion latents."""
        shift, scale = self._vectors(z)
        return (z + shift) / scale

    def denormalize(self, z: Tensor) -> Tensor:
        """Inverse of ``normalize``."""
        shift, scale = self._vectors(z)
        return z * scale - shift

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatentNorm:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"latent_norm has unknown keys {sorted(unknown)}; allowed keys are {sorted(fields)}.")
        norm = cls(**{k: float(v) for k, v in d.items()})
        if norm.first_scale <= 0 or norm.rest_scale <= 0:
            raise ValueError(f"latent_norm scales must be positive, got {norm}.")
        return norm

    @classmethod
    def estimate(cls, raw_latents: Tensor) -> LatentNorm:
        """Fit shift = -mean and scale = std, separately for latent frame 0 and frames 1.., from raw latents."""
        if raw_latents.ndim != 5 or raw_latents.shape[2] < 2:
            raise ValueError("raw_latents must be [B, C, T, h, w] with T >= 2 to estimate both frame groups.")
        first, rest = raw_latents[:, :, :1].double(), raw_latents[:, :, 1:].double()
        return cls(
            first_shift=-first.mean().item(),
            first_scale=first.std().item(),
            rest_shift=-rest.mean().item(),
            rest_scale=rest.std().item(),
        )


def _ltx_config(channels: tuple[int, ...], layers: tuple[int, ...]) -> dict[str, Any]:
    return dict(
        in_channels=3,
        out_channels=3,
        latent_channels=16,
        block_out_channels=channels,
        decoder_block_out_channels=channels,
        layers_per_block=layers,
        decoder_layers_per_block=layers,
        spatio_temporal_scaling=(True, True, True, False),
        decoder_spatio_temporal_scaling=(True, True, True, False),
        decoder_inject_noise=(False,) * (len(channels) + 1),
        upsample_residual=(False,) * len(channels),
        upsample_factor=(1,) * len(channels),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=True,
    )


VAE_CONFIGS: dict[str, dict[str, Any]] = {
    # Paper scale: 16 latent channels, 8x8x8, block widths of CogVideoX's VAE (128, 256, 256, 512),
    # 3 resnets per stage: about 274M parameters (126M encoder).
    "m4v-768p": _ltx_config((128, 256, 256, 512), (3, 3, 3, 3, 3)),
    # Tests and CPU smoke runs: encode + decode of a 17-frame 64x64 clip in about 0.1-0.3 s on 2 idle CPU cores.
    "tiny": _ltx_config((8, 8, 16, 16), (0, 0, 1, 1, 1)),
}

# Latent normalisation per named config. The tiny VAE is untrained, so its latents keep their raw scale.
VAE_LATENT_NORMS: dict[str, LatentNorm] = {
    "m4v-768p": LatentNorm(),
    "tiny": LatentNorm(0.0, 1.0, 0.0, 1.0),
}


def _nearest_frames(num_frames: int) -> int:
    k = max(0, (num_frames - 1 + TEMPORAL_COMPRESSION // 2) // TEMPORAL_COMPRESSION)
    return 1 + TEMPORAL_COMPRESSION * k


def _nearest_multiple(size: int, m: int) -> int:
    return max(m, (size + m // 2) // m * m)


class _CausalStream:
    """Runs an LTX encoder or decoder over consecutive time chunks, carrying each causal conv's tail.

    While active, every ``LTXVideoCausalConv3d`` prepends the input frames that the previous chunk left
    unused (instead of repeating its first frame) and every ``LTXVideoUpsampler3d`` drops its leading
    sub-frame only on the first chunk. Caches are keyed by the call index of the root module inside one
    chunk, so the diffusers class's batch slicing and spatial tiling (which call the root once per slice
    or tile, in a fixed order) keep one cache per slice/tile.
    """

    def __init__(self, root: nn.Module) -> None:
        self.root = root
        self.call = -1
        self.cache: dict[tuple[int, int], Tensor] = {}
        self.started: set[tuple[int, int]] = set()

    def next_chunk(self) -> None:
        self.call = -1

    def _count_call(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        self.call += 1

    def _conv(self, m: LTXVideoCausalConv3d, x: Tensor) -> Tensor:
        kt, st = m.kernel_size[0], m.conv.stride[0]
        if kt == 1 and st == 1:
            return m.conv(x)
        key = (self.call, id(m))
        prev = self.cache.get(key)
        if prev is None:
            prev = x[:, :, :1].expand(-1, -1, kt - 1, -1, -1)
        x = torch.cat([prev, x], dim=2)
        n_out = (x.shape[2] - kt) // st + 1 if x.shape[2] >= kt else 0
        if n_out == 0:
            raise RuntimeError("a causal VAE chunk is too short for a strided convolution; use longer chunks")
        self.cache[key] = x[:, :, n_out * st :].clone()
        return m.conv(x[:, :, : (n_out - 1) * st + kt])

    @staticmethod
    def _depth_to_space(x: Tensor, stride: tuple[int, int, int]) -> Tensor:
        b, _, t, h, w = x.shape
        s0, s1, s2 = stride
        x = x.reshape(b, -1, s0, s1, s2, t, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
        return x.reshape(b, -1, t * s0, h * s1, w * s2)

    def _upsample(self, m: LTXVideoUpsampler3d, x: Tensor) -> Tensor:
        key = (self.call, id(m))
        drop = 0 if key in self.started else m.stride[0] - 1
        self.started.add(key)
        out = self._depth_to_space(m.conv(x), m.stride)[:, :, drop:]
        if m.residual:
            s0, s1, s2 = m.stride
            res = self._depth_to_space(x, m.stride).repeat(1, (s0 * s1 * s2) // m.upscale_factor, 1, 1, 1)
            out = out + res[:, :, drop:]
        return out

    @contextmanager
    def active(self) -> Iterator[_CausalStream]:
        patched: list[nn.Module] = []
        handle = self.root.register_forward_pre_hook(self._count_call)
        try:
            for m in self.root.modules():
                if isinstance(m, LTXVideoCausalConv3d):
                    if not m.is_causal or m.conv.dilation[0] != 1:
                        raise ValueError("chunked VAE passes need causal, undilated temporal convolutions")
                    m.forward = lambda x, m=m: self._conv(m, x)
                    patched.append(m)
                elif isinstance(m, LTXVideoUpsampler3d):
                    m.forward = lambda x, m=m: self._upsample(m, x)
                    patched.append(m)
            yield self
        finally:
            handle.remove()
            for m in patched:
                del m.forward


def stored_latent_norm(model: Any) -> LatentNorm:
    """The normalisation saved in an ``AutoencoderKLLTXVideo``'s config.json (the identity when it has none)."""
    stored = model.config.get(NORM_CONFIG_KEY)
    return LatentNorm.from_dict(stored) if stored is not None else LatentNorm()


class VideoVAE(nn.Module):
    """Frozen causal video VAE with PyramidFlow latent normalisation and exact chunked encode/decode."""

    def __init__(
        self,
        model: AutoencoderKLLTXVideo,
        latent_norm: LatentNorm | None = None,
        encode_chunk_latents: int = 4,
        decode_chunk_latents: int = 2,
    ) -> None:
        super().__init__()
        cfg = model.config
        if cfg.patch_size_t != 1 or cfg.timestep_conditioning or any(cfg.decoder_inject_noise):
            raise ValueError("model must have patch_size_t=1, no timestep conditioning and no noise injection.")
        if model.temporal_compression_ratio != TEMPORAL_COMPRESSION or (
            model.spatial_compression_ratio != SPATIAL_COMPRESSION
        ):
            raise ValueError(
                "model must compress 8x in time and space, got "
                f"{model.temporal_compression_ratio}x / {model.spatial_compression_ratio}x."
            )
        self.model = model
        self.model.eval().requires_grad_(False)
        if latent_norm is None:
            latent_norm = stored_latent_norm(model)
        self.model.register_to_config(**{NORM_CONFIG_KEY: latent_norm.to_dict()})
        self.latent_norm = latent_norm
        self.encode_chunk_latents = encode_chunk_latents
        self.decode_chunk_latents = decode_chunk_latents

    # ----------------------------------------------------------------------------------------- properties
    @property
    def latent_channels(self) -> int:
        return int(self.model.config.latent_channels)

    @property
    def temporal_compression(self) -> int:
        return TEMPORAL_COMPRESSION

    @property
    def spatial_compression(self) -> int:
        return SPATIAL_COMPRESSION

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @property
    def device(self) -> torch.device:
        return self.model.device

    @staticmethod
    def num_latent_frames(num_frames: int) -> int:
        """1 + 8k video frames -> 1 + k latent frames (121 -> 16, 241 -> 31)."""
        return (num_frames - 1) // TEMPORAL_COMPRESSION + 1

    @staticmethod
    def num_video_frames(num_latent_frames: int) -> int:
        """1 + k latent frames -> 1 + 8k video frames."""
        return (num_latent_frames - 1) * TEMPORAL_COMPRESSION + 1

    @staticmethod
    def check_video_shape(num_frames: int, height: int, width: int) -> None:
        """Raise ValueError naming the nearest valid value unless frames = 1 + 8k and H, W divide by 8."""
        if num_frames < 1 or (num_frames - 1) % TEMPORAL_COMPRESSION:
            raise ValueError(
                f"num_frames must be 1 + 8k (1, 9, 17, ..., 121); got {num_frames}, "
                f"nearest valid is {_nearest_frames(num_frames)}."
            )
        for name, size in (("height", height), ("width", width)):
            if size < SPATIAL_COMPRESSION or size % SPATIAL_COMPRESSION:
                raise ValueError(
                    f"{name} must be a positive multiple of {SPATIAL_COMPRESSION}; got {size}, "
                    f"nearest valid is {_nearest_multiple(size, SPATIAL_COMPRESSION)}."
                )

    def enable_tiling(self, **kwargs: Any) -> None:
        """Spatial tiling of the diffusers class (tiles are blended, so results differ slightly at seams)."""
        self.model.enable_tiling(**kwargs)

    def disable_tiling(self) -> None:
        self.model.disable_tiling()

    def enable_slicing(self) -> None:
        """Encode/decode one batch element at a time (the diffusers class's slicing)."""
        self.model.enable_slicing()

    def disable_slicing(self) -> None:
        self.model.disable_slicing()

    def train(self, mode: bool = True) -> VideoVAE:
        """The VAE stays frozen in eval mode (PyramidFlow and M4V never train it)."""
        return super().train(False)

    # --------------------------------------------------------------------------------------------- encode
    @contextmanager
    def _streaming(self, root: nn.Module) -> Iterator[_CausalStream]:
        saved = (self.model.use_framewise_encoding, self.model.use_framewise_decoding)
        self.model.use_framewise_encoding = self.model.use_framewise_decoding = False
        try:
            with _CausalStream(root).active() as stream:
                yield stream
        finally:
            self.model.use_framewise_encoding, self.model.use_framewise_decoding = saved

    def _moments(self, video: Tensor, chunk_latents: int) -> Tensor:
        if chunk_latents <= 0 or video.shape[2] == 1:
            return self.model.encode(video).latent_dist.parameters
        step = chunk_latents * TEMPORAL_COMPRESSION
        bounds = [0, 1] + list(range(1 + step, video.shape[2], step)) + [video.shape[2]]
        bounds = sorted(set(bounds))
        parts = []
        with self._streaming(self.model.encoder) as stream:
            for a, b in zip(bounds[:-1], bounds[1:]):
                stream.next_chunk()
                parts.append(self.model.encode(video[:, :, a:b]).latent_dist.parameters)
        return torch.cat(parts, dim=2)

    @torch.no_grad()
    def encode_raw(
        self,
        video: Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        chunk_latents: int | None = None,
    ) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> unnormalised latents [B, 16, 1 + (F-1)/8, H/8, W/8]."""
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, F, H, W]; got shape {tuple(video.shape)}.")
        self.check_video_shape(*video.shape[2:])
        chunk = self.encode_chunk_latents if chunk_latents is None else chunk_latents
        video = video.to(device=self.device, dtype=self.dtype)
        posterior = DiagonalGaussianDistribution(self._moments(video, chunk))
        return posterior.sample(generator=generator) if sample else posterior.mode()

    def encode(
        self,
        video: Tensor,
        generator: torch.Generator | None = None,
        sample: bool = True,
        chunk_latents: int | None = None,
    ) -> Tensor:
        """Video [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, 1 + (F-1)/8, H/8, W/8].

        ``sample=False`` returns the posterior mean. ``chunk_latents`` (default ``encode_chunk_latents``)
        is the number of latent frames per streamed chunk after the first frame, which is always its own
        chunk; 0 encodes the clip in one pass. Chunked and one-pass results agree to float rounding.
        """
        return self.latent_norm.normalize(self.encode_raw(video, generator, sample, chunk_latents))

    # --------------------------------------------------------------------------------------------- decode
    @torch.no_grad()
    def decode_raw(self, latents: Tensor, chunk_latents: int | None = None) -> Tensor:
        """Unnormalised latents [B, 16, T, h, w] -> video [B, 3, 1 + 8(T-1), 8h, 8w] (not clamped)."""
        if latents.ndim != 5 or latents.shape[1] != self.latent_channels or 0 in latents.shape[2:]:
            raise ValueError(
                f"latents must be [B, {self.latent_channels}, T, h, w] with T, h, w >= 1; "
                f"got shape {tuple(latents.shape)}."
            )
        chunk = self.decode_chunk_latents if chunk_latents is None else chunk_latents
        latents = latents.to(device=self.device, dtype=self.dtype)
        t = latents.shape[2]
        if chunk <= 0 or t == 1:
            return self.model.decode(latents).sample
        bounds = sorted(set([0, 1] + list(range(1 + chunk, t, chunk)) + [t]))
        parts = []
        with self._streaming(self.model.decoder) as stream:
            for a, b in zip(bounds[:-1], bounds[1:]):
                stream.next_chunk()
                parts.append(self.model.decode(latents[:, :, a:b]).sample)
        return torch.cat(parts, dim=2)

    def decode(self, latents: Tensor, chunk_latents: int | None = None) -> Tensor:
        """Normalised latents [B, 16, T, h, w] -> video [B, 3, 1 + 8(T-1), 8h, 8w] clamped to [-1, 1].

        ``chunk_latents`` (default ``decode_chunk_latents``) latent frames are decoded per streamed chunk,
        the first latent frame alone; 0 decodes in one pass (with the class's spatial tiling if enabled).
        """
        return self.decode_raw(self.latent_norm.denormalize(latents), chunk_latents).clamp(-1.0, 1.0)

    # ------------------------------------------------------------------------------------------ save/load
    def save_pretrained(self, path: str | os.PathLike[str], **kwargs: Any) -> None:
        """diffusers ``save_pretrained`` of the wrapped model; the normalisation is inside config.json."""
        self.model.save_pretrained(path, **kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> VideoVAE:
        """Load a folder written by ``save_pretrained`` (local files only; no hub downloads)."""
        from m4v.models.loading import load_strict

        return cls(load_strict(AutoencoderKLLTXVideo.from_pretrained, "AutoencoderKLLTXVideo", path, "VAE", **kwargs))


def build_video_vae(name: str, latent_norm: LatentNorm | None = None, **overrides: Any) -> VideoVAE:
    """Randomly initialised VideoVAE for a named config ("m4v-768p" or "tiny"); overrides edit the config."""
    if name not in VAE_CONFIGS:
        raise ValueError(f"unknown VAE config {name!r}; choose one of {sorted(VAE_CONFIGS)}.")
    cfg = copy.deepcopy(VAE_CONFIGS[name])
    cfg.update(overrides)
    return VideoVAE(AutoencoderKLLTXVideo(**cfg), latent_norm or VAE_LATENT_NORMS[name])

"""The downloader's settings (:class:`DownloadConfig`): what the pipeline parameters set, the
limits and retry policy they leave at a default, checked when made; and the SSRF guard and
per-host policy they give the :class:`~.download.Downloader`."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .. import __version__
from ..config import PipelineParams
from .guard import AddressGuard
from .hosts import HostPolicy

_DEFAULTS = PipelineParams()

# Who we are and where a webmaster reads what we fetch and how to opt out (docs/images.md,
# "Politeness"); a deployment adds its own contact with ``image_user_agent``.
DEFAULT_USER_AGENT = (f"item-embeddings/{__version__} (catalogue image embeddings; about this "
                      "robot and its opt-outs: the item-embeddings docs, images.md#politeness)")


@dataclass(frozen=True)
class DownloadConfig:
    """Knobs of the downloader; the pipeline parameters set some (:meth:`from_params`)."""

    concurrency: int = _DEFAULTS.download_concurrency
    per_host_limit: int = 32        # connections (requests in flight) per host
    rate_per_host: float = _DEFAULTS.download_rate_per_host  # requests/s per host; 0 = no limit
    host_failure_limit: int = _DEFAULTS.host_failure_limit   # circuit breaker; 0 = off
    breaker_cooldown_s: float = 30.0  # an open breaker lets a probe through after this (doubling)
    timeout_s: float = _DEFAULTS.download_timeout_s  # per attempt, redirects and body included
    retries: int = _DEFAULTS.download_retries  # after a timeout, 5xx, 429 or connection error
    backoff_base_s: float = 0.5     # first retry waits about this long, doubling after
    retry_after_cap_s: float = 10.0
    max_redirects: int = 5
    max_bytes: int = _DEFAULTS.max_image_bytes
    user_agent: str = DEFAULT_USER_AGENT
    respect_opt_out: bool = _DEFAULTS.respect_opt_out
    respect_robots_txt: bool = _DEFAULTS.respect_robots_txt
    allow_private_hosts: bool = _DEFAULTS.allow_private_hosts
    exempt_networks: tuple[str, ...] = ()
    dns_cache_ttl_s: int = 300

    @classmethod
    def from_params(cls, params: PipelineParams) -> DownloadConfig:
        """The downloader the pipeline parameters ask for."""
        return cls(concurrency=params.download_concurrency, timeout_s=params.download_timeout_s,
                   retries=params.download_retries, max_bytes=params.max_image_bytes,
                   rate_per_host=params.download_rate_per_host,
                   host_failure_limit=params.host_failure_limit,
                   user_agent=params.image_user_agent or DEFAULT_USER_AGENT,
                   respect_opt_out=params.respect_opt_out,
                   respect_robots_txt=params.respect_robots_txt,
                   allow_private_hosts=params.allow_private_hosts)

    def __post_init__(self) -> None:
        for name in ("concurrency", "per_host_limit", "max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if self.retries < 0 or self.max_redirects < 0 or self.host_failure_limit < 0:
            raise ValueError("retries, max_redirects and host_failure_limit must be >= 0")
        if not (0 <= self.rate_per_host < float("inf")) or self.breaker_cooldown_s <= 0:
            raise ValueError(f"rate_per_host must be >= 0 (got {self.rate_per_host}) and "
                             f"breaker_cooldown_s > 0 (got {self.breaker_cooldown_s})")

    def guard(self) -> AddressGuard:
        return AddressGuard(enabled=not self.allow_private_hosts,
                            exempt=tuple(ipaddress.ip_network(n) for n in self.exempt_networks))

    def host_policy(self) -> HostPolicy:
        return HostPolicy(failure_limit=self.host_failure_limit, rate=self.rate_per_host,
                          connections=self.per_host_limit, cooldown_s=self.breaker_cooldown_s,
                          max_pause_s=self.retry_after_cap_s)

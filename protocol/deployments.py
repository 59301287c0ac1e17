"""The messages of the deployment methods (specs/PROTOCOL.md §7.7.1), in the catalogue.

Frozen, keyword-only attrs classes with bounded fields, like every message
(messages.py, which lists them in ``METHODS`` and re-exports them).
"""

from __future__ import annotations

from typing import Any, Final

import attrs
from attrs import field, frozen
from attrs.validators import deep_iterable, deep_mapping, instance_of, max_len, optional

from .limits import DEFAULT_PAGE, MAX_PAGE, MAX_WIRE_INT
from .validators import COUNT, float_range, int_range, one_of

#: What a deployment does to its release when its halt rule trips.
ON_HALT: Final = ("pause", "revoke")
#: A deployment's states: ``running`` starts devices; ``paused`` (operator) and
#: ``halted`` (the rule) start none until resumed; ``aborted`` and
#: ``completed`` are final.
DEPLOYMENT_STATES: Final = ("running", "paused", "halted", "aborted", "completed")
#: A device's states within a deployment: ``pending`` (not started yet),
#: ``started`` (pushed, updating), ``deferred`` (the device said not now),
#: ``succeeded`` (its trial committed), ``failed``, ``skipped`` (not started:
#: already on the version, failed it before, or forgotten).
DEPLOYMENT_DEVICE_STATES: Final = (
    "pending",
    "started",
    "deferred",
    "succeeded",
    "failed",
    "skipped",
)
#: Most phases, and most characters of a phase (``"12.5%"``).
MAX_PHASES: Final = 20
#: Most devices a deployment may name one by one (``devices``).
MAX_DEPLOY_DEVICES: Final = 100_000
#: A week: the longest ``phase_wait`` and ``device_timeout`` (seconds).
MAX_DEPLOY_SECONDS: Final = 7 * 24 * 3600.0


def _short_items(_inst: object, attribute: attrs.Attribute[Any], value: list[str]) -> None:
    for item in value:
        if not isinstance(item, str) or len(item) > 16:
            raise ValueError(f"{attribute.name}: each phase is a short string like 10% or 50")


@frozen(kw_only=True)
class DeployCreate:
    """Params of ``deploy_create`` (§7.7.1): the release, its targets, phases and halt rule."""

    app: str = field(validator=max_len(256))
    version: str = field(validator=max_len(256))
    devices: list[str] = field(factory=list, validator=max_len(MAX_DEPLOY_DEVICES))
    group: str | None = None
    all: bool = False
    #: only this share of the matching devices (a deterministic sample)
    percent: float = field(default=100.0, validator=float_range(0.001, 100))
    #: cumulative, each ``"N%"`` or a count ``"N"``; [] = one phase of every target
    phases: list[str] = field(factory=list, validator=[max_len(MAX_PHASES), _short_items])
    #: devices updating at once; 0 = no limit
    max_concurrent: int = field(default=0, validator=COUNT)
    #: halt when the failed share of finished devices reaches this; nil = no rule
    halt_after_failures: float | None = field(default=None, validator=optional(float_range(0, 100)))
    min_executed: int = field(default=1, validator=int_range(1, MAX_WIRE_INT))
    on_halt: str = field(default="pause", validator=one_of(ON_HALT))
    #: start the next phase after this many seconds even if devices are still open
    phase_wait: float | None = field(
        default=None, validator=optional(float_range(0, MAX_DEPLOY_SECONDS))
    )
    #: a started device that reports no progress for this long has failed
    device_timeout: float = field(default=900.0, validator=float_range(1, MAX_DEPLOY_SECONDS))
    #: start devices that failed this release before (else they are skipped)
    retry_failed: bool = False
    restart: bool | None = None


@frozen(kw_only=True)
class DeploymentDevice:
    device_id: str
    phase: int = field(validator=int_range(0, MAX_PHASES))
    state: str = field(validator=one_of(DEPLOYMENT_DEVICE_STATES))
    reason: str = ""
    push_id: str | None = None
    started: float | None = None
    finished: float | None = None


@frozen(kw_only=True)
class DeploymentInfo:
    deployment_id: str
    app: str
    version: str
    state: str = field(validator=one_of(DEPLOYMENT_STATES))
    #: why it is halted, paused, aborted (one sentence), else ""
    reason: str
    created: float
    operator: str
    #: index of the current phase in ``phases``
    phase: int = field(validator=int_range(0, MAX_PHASES))
    #: cumulative device counts of each phase
    phases: list[int] = field(
        validator=deep_iterable(member_validator=COUNT, iterable_validator=max_len(MAX_PHASES))
    )
    targets: int = field(validator=COUNT)
    #: devices by state (DEPLOYMENT_DEVICE_STATES)
    counts: dict[str, int] = field(factory=dict, validator=deep_mapping(instance_of(str), COUNT))
    max_concurrent: int = field(default=0, validator=COUNT)
    halt_after_failures: float | None = None
    min_executed: int = field(default=1, validator=COUNT)
    on_halt: str = "pause"
    phase_wait: float | None = None
    device_timeout: float = 900.0
    selector: dict[str, Any] = field(factory=dict)
    #: one page of its devices (``deploy_show`` only), by rollout order
    devices: list[DeploymentDevice] = field(factory=list)
    #: cursor of the next page of ``devices``, nil on the last
    next: str | None = None


@frozen(kw_only=True)
class DeployFilter:
    app: str | None = None
    #: only these states; [] = all
    states: list[str] = field(factory=list, validator=max_len(len(DEPLOYMENT_STATES)))
    limit: int = field(default=DEFAULT_PAGE, validator=int_range(1, MAX_PAGE))


@frozen(kw_only=True)
class DeployList:
    """Newest first (no cursor: a releaser keeps few deployments)."""

    deployments: list[DeploymentInfo]


@frozen(kw_only=True)
class DeployShow:
    deployment_id: str = field(validator=max_len(64))
    after: str | None = None
    limit: int = field(default=MAX_PAGE, validator=int_range(1, MAX_PAGE))


@frozen(kw_only=True)
class DeployRef:
    """Params of ``deploy_pause``, ``deploy_resume``, ``deploy_abort``."""

    deployment_id: str = field(validator=max_len(64))
    #: resume only: start again the devices of this deployment that failed
    retry_failed: bool = False

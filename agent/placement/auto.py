"""Auto-placement: put each model where it runs best, spreading competing models across accelerators.

The paper's second technique. `backend: "auto"` (or `device: "auto"`) tenants are profiled on every
candidate (profiler.py, cached), then `choose` assigns candidates to maximise the estimated total;
several auto tenants are also measured side by side, since solo figures cannot predict how runtimes
share cores. Tenants with `auto_tune` also get their instances, threads and batch limit from a
measured latency table (tuning.py): the most frames per second, or with `latency_objective_ms` the
most answers within it. The choice and its reason are reported in status (docs/protocol.md, `auto`).
"""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from agent.frames.slo_threads import apply_budget
from agent.placement.profiler import Candidate, Profiler
from agent.placement.tuning import Tuned, configs, tune
from agent.protocol.auto_choice import TunedChoice
from agent.protocol.schemas import AutoChoice, BatchSpec, Placement, TenantSpec
from agent.service.errors import PlacementRefused
from agent.service.model_repo import ModelError, ModelRepository
from backends import registry

log = logging.getLogger(__name__)
T = TypeVar("T")
# Runs a blocking call that may hang (a runtime, a driver) under the load deadline; `what` names it.
RuntimeCall = Callable[[Callable[[], Any], str], Awaitable[Any]]


def host_cores() -> int:
    """The cores this process may run on (a container or `taskset` may allow fewer than the host has)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def is_auto(spec: TenantSpec) -> bool:
    """A backend that declares an `AUTO` device of its own (OpenVINO) means that device, not a request
    to profile."""
    if spec.backend == "auto":
        return True
    own = {d.lower() for d in registry.info(spec.backend).devices}
    return spec.device.lower() == "auto" and "auto" not in own


def resource_of(backend: str, device: str) -> str:
    """The physical resource a backend/device runs on, as the backend declares it (backends on the
    host CPU share it; ONNX Runtime's `tensorrt:0` and PyTorch's `cuda:0` are one GPU)."""
    return registry.resource_of(backend, device)


def takes_thread_budget(backend: str) -> bool:
    """Whether a backend's tenants take part in the thread budget (`BackendInfo.thread_budget`)."""
    try:
        return registry.info(backend).thread_budget
    except Exception:  # an unknown backend: counted, as before
        return True


def candidates_for(backend: str, device: str) -> list[Candidate]:
    """Backend/device pairs an auto tenant may use: every available one, or one backend's devices."""
    out: list[Candidate] = []
    for name, (ok, devices, _reason) in registry.capabilities().items():
        if not ok or backend not in ("auto", name):
            continue
        for d in devices:
            if d.upper() == "AUTO":
                continue  # a runtime's own AUTO device (OpenVINO's) re-picks a device we profile anyway
            if device.lower() != "auto" and d.lower() != device.lower():
                continue
            out.append((name, d))
    return out


def goodput(fps: float, instances: int, objective_ms: float | None) -> float:
    """Frames per second answered within the objective: all of `fps`, unless one frame's own time
    (`instances` / fps, each instance serving one frame at a time) is over the objective, then none."""
    if objective_ms is None or fps <= 0:
        return fps
    return fps if 1000.0 * instances / fps <= objective_ms else 0.0


def choose(
    tenants: Mapping[str, Mapping[Candidate, float]],
    fixed: Mapping[str, Candidate] | None = None,
    objectives: Mapping[str, tuple[int, float | None]] | None = None,
) -> dict[str, Candidate]:
    """Assign each auto tenant a candidate to maximise estimated total goodput.

    Tenants sharing a physical resource split its time evenly, so two models on the same CPU each
    get half of their solo rate; on different accelerators each keeps its own. `fixed` tenants
    (explicit placements) occupy their resource too. A tenant with a latency objective
    (`objectives`: model -> (instances, objective ms)) counts only where its share of the resource
    still answers a frame within it (`goodput`). Exhaustive for small fleets, greedy beyond.
    """
    fixed = dict(fixed or {})
    names = sorted(tenants)
    slo = dict(objectives or {})

    def score(assignment: Mapping[str, Candidate]) -> float:
        load: dict[str, int] = {}
        for cand in list(assignment.values()) + list(fixed.values()):
            res = resource_of(*cand)
            load[res] = load.get(res, 0) + 1
        return sum(
            goodput(tenants[n][c] / load[resource_of(*c)], *slo.get(n, (1, None)))
            for n, c in assignment.items()
        )

    options = [sorted(tenants[n], key=lambda c: -tenants[n][c]) for n in names]
    combos = 1
    for o in options:
        combos *= max(1, len(o))
    if combos <= 20_000:
        best: dict[str, Candidate] = {}
        best_score = -1.0
        for pick in itertools.product(*options):
            assignment = dict(zip(names, pick, strict=True))
            value = score(assignment)
            if value > best_score:
                best, best_score = assignment, value
        return best
    greedy: dict[str, Candidate] = {}
    for n, opts in sorted(zip(names, options, strict=True), key=lambda p: -max(tenants[p[0]].values())):
        greedy[n] = max(opts, key=lambda c: score({**greedy, n: c}))
    return greedy


def shortlist(
    measured: Mapping[str, Mapping[Candidate, float]], per_tenant: int = 2
) -> dict[str, list[Candidate]]:
    """Each tenant's best solo candidates: what is worth measuring together."""
    return {
        name: sorted(figures, key=lambda c: -figures[c])[:per_tenant] for name, figures in measured.items()
    }


class AutoPlacer:
    """Resolves the auto tenants of a placement into measured (backend, device) choices."""

    def __init__(self, repo: ModelRepository, profiler: Profiler, runtime_call: RuntimeCall) -> None:
        self.repo = repo
        self.profiler = profiler
        self.runtime_call = runtime_call

    async def resolve(self, placement: Placement) -> tuple[Placement, dict[str, AutoChoice]]:
        """Replace `backend: "auto"` / `device: "auto"` with measured choices (profiles cached), then
        give tenants sharing the CPU their share of threads (agent/frames/slo_threads.py)."""
        resolved, choices = await self._resolve_auto(placement)
        if os.environ.get("EDGE_AGENT_THREAD_BUDGET", "1") == "0":  # each runtime's own default
            return resolved, choices
        tenants = apply_budget(resolved.tenants, host_cores(), resource_of, takes_thread_budget)
        return resolved.model_copy(update={"tenants": tenants}), choices

    async def _resolve_auto(self, placement: Placement) -> tuple[Placement, dict[str, AutoChoice]]:
        autos = [t for t in placement.tenants if is_auto(t) or t.auto_tune]
        if not autos:
            return placement, {}
        fixed = {t.model: (t.backend, t.device) for t in placement.tenants if t not in autos}
        measured: dict[str, dict[Candidate, float]] = {}
        listed: dict[str, list[Candidate]] = {}
        for spec in autos:
            listed[spec.model] = await self.runtime_call(
                functools.partial(candidates_for, spec.backend, spec.device),
                f"listing devices for {spec.model}",
            )
        tuned: dict[str, dict[Candidate, Tuned]] = {}
        tables: dict[str, dict[Candidate, dict[str, float]]] = {}
        for spec in autos:
            try:
                model = await asyncio.to_thread(self.repo.load, spec.model, True, spec.version)
            except ModelError as exc:
                raise PlacementRefused(str(exc)) from exc
            figures: dict[Candidate, float] = {}
            for backend, device in listed[spec.model]:
                figures[(backend, device)] = await self.runtime_call(
                    functools.partial(self.profiler.measure, model, backend, device, spec.instances),
                    f"measuring {spec.model} on {backend}:{device}",
                )
            figures = {c: f for c, f in figures.items() if f > 0}
            if not figures:
                raise PlacementRefused(f"auto placement of {spec.model}: no available backend could run it")
            if spec.auto_tune:
                tuned[spec.model], tables[spec.model] = await self._tune(spec, model, figures, fixed, listed)
                figures = {c: t.goodput for c, t in tuned[spec.model].items()} or figures
            measured[spec.model] = figures
        # Tuned tenants' figures already count only the answers within their objective.
        objectives = {t.model: (t.instances, None if t.auto_tune else t.latency_objective_ms) for t in autos}
        picks = choose(measured, fixed, objectives)
        together: dict[str, float] | None = None
        if len(autos) >= 2 and not tuned:
            picks, together = await self._choose_together(autos, measured, picks)
        choices = {model: explain(model, pick, measured, together) for model, pick in picks.items()}
        tenants = []
        for spec in placement.tenants:
            choice = choices.get(spec.model)
            if choice is None:
                tenants.append(spec)
                continue
            update: dict[str, Any] = {"backend": choice.backend, "device": choice.device}
            pick = picks[spec.model]
            if pick in tuned.get(spec.model, {}):
                best = tuned[spec.model][pick]
                choice.tuned = tuned_choice(best, tables[spec.model][pick])
                choice.reason = f"{choice.reason}; {best.config.label}: {best.reason}"
                update.update(
                    instances=best.config.instances,
                    threads=best.config.threads,
                    batch=BatchSpec(max_size=best.config.batch, max_delay_ms=spec.batch.max_delay_ms),
                )
            tenants.append(spec.model_copy(update=update))
        log.info("auto placement: %s", {m: f"{c.backend}:{c.device}" for m, c in choices.items()})
        return placement.model_copy(update={"tenants": tenants}), choices

    async def _tune(
        self,
        spec: TenantSpec,
        model: Any,
        figures: Mapping[Candidate, float],
        fixed: Mapping[str, Candidate],
        listed: Mapping[str, list[Candidate]],
    ) -> tuple[dict[Candidate, Tuned], dict[Candidate, dict[str, float]]]:
        """Measure the latency table of `spec`'s shortlisted candidates and tune each (tuning.py).

        A resource is shared by the fixed tenants on it and by every other auto tenant that may
        run there: an accelerator is taken in turns, the host's cores are split as many ways
        (tuning.py `slowdown`).
        """
        out: dict[Candidate, Tuned] = {}
        tables: dict[Candidate, dict[str, float]] = {}
        for cand in shortlist({spec.model: figures})[spec.model]:
            res = resource_of(*cand)
            share = 1 + sum(1 for c in fixed.values() if resource_of(*c) == res)
            share += sum(
                1
                for name, cands in listed.items()
                if name != spec.model and any(resource_of(*c) == res for c in cands)
            )
            on_host = res == "cpu"  # the resource backends name the host CPU (slo_threads.HOST)
            cores = max(1, host_cores() // share) if on_host else 1
            shapes = configs(cores, max_instances=2 if host_cores() >= 2 else 1)
            table = await self.runtime_call(
                functools.partial(self.profiler.measure_table, model, cand[0], cand[1], shapes),
                f"measuring {spec.model}'s batch sizes on {cand[0]}:{cand[1]}",
            )
            best = tune(
                table,
                spec.latency_objective_ms,
                spec.batch.max_delay_ms,
                share,
                host_cores() if on_host else None,
            )
            if best is not None:
                out[cand] = best
                tables[cand] = {c.label: round(ms, 2) for c, ms in sorted(table.items())}
        return out, tables

    async def _choose_together(
        self,
        autos: list[TenantSpec],
        measured: dict[str, dict[Candidate, float]],
        picks: dict[str, Candidate],
    ) -> tuple[dict[str, Candidate], dict[str, float] | None]:
        """Several auto tenants compete: run the shortlisted combinations side by side and keep the
        best total. Solo figures cannot predict how runtimes share cores (measured: two models
        spread over ONNX Runtime and OpenVINO beat both on the solo-fastest one by 12%)."""
        names = [t.model for t in autos]
        short = shortlist(measured)
        combos = list(itertools.product(*(short[n] for n in names)))
        if len(combos) > 16:
            return picks, None  # too many to measure; the even-split estimate stands
        models = {n: await asyncio.to_thread(self.repo.load, n) for n in names}
        instances = {t.model: t.instances for t in autos}
        totals: dict[str, float] = {}
        best, best_total = picks, -1.0
        for combo in combos:
            label = " + ".join(f"{n}@{b}:{d}" for n, (b, d) in zip(names, combo, strict=True))
            figures: list[float] = await self.runtime_call(
                functools.partial(
                    self.profiler.measure_together,
                    [(models[n], b, d, instances[n]) for n, (b, d) in zip(names, combo, strict=True)],
                ),
                f"measuring {label} together",
            )
            # Within objectives: a tenant too slow for its objective in this combination adds nothing.
            total = sum(
                goodput(f, t.instances, t.latency_objective_ms) for f, t in zip(figures, autos, strict=True)
            )
            totals[label] = round(total, 1)
            if total > best_total:
                best, best_total = dict(zip(names, combo, strict=True)), total
        return best, totals


def tuned_choice(best: Tuned, table: dict[str, float]) -> TunedChoice:
    """What status shows of a tuned tenant's configuration."""
    return TunedChoice(
        instances=best.config.instances,
        threads=best.config.threads,
        batch_max_size=best.config.batch,
        fps=round(best.fps, 1),
        goodput=round(best.goodput, 1),
        latency_ms=round(best.latency_ms, 1),
        reason=best.reason,
        table=table,
    )


def explain(
    model: str,
    pick: Candidate,
    measured: Mapping[str, Mapping[Candidate, float]],
    together: dict[str, float] | None,
) -> AutoChoice:
    """The choice for `model` with the reason status shows for it."""
    figures = measured[model]
    solo_best = max(figures, key=lambda c: figures[c])
    if together is not None:
        reason = (
            f"measured together with the other auto tenants: the best of {len(together)} "
            f"combinations, {max(together.values()):.0f} img/s in total"
        )
    elif pick == solo_best:
        reason = "fastest measured here"
    else:
        reason = "spread: its fastest device is busy with another tenant; this maximises the total"
    return AutoChoice(
        backend=pick[0],
        device=pick[1],
        reason=reason,
        candidates={f"{b}:{d}": round(f, 1) for (b, d), f in figures.items()},
        together=together,
    )

"""Turning planned events into RQ jobs: idempotency checks and one atomic write per batch."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Any

import msgpack
import redis
from redis import Redis
from rq import Queue
from rq.job import Job, JobStatus
from rq.registry import DeferredJobRegistry
from rq.utils import now as rq_now
from rq.utils import utcformat

from dicomflow import keys
from dicomflow.errors import ConfigError, DicomflowError
from dicomflow.events import Event, Level
from dicomflow.settings import Settings
from scheduler.callbacks import CallbackRunner
from scheduler.jobhash import JobHashes
from scheduler.batching import Batcher, Chunk
from scheduler.planning import Plan, PlannedJob, plan_event
from scheduler.pushes import PushTracker
from scheduler.registry import Registry
from scheduler.scripts import APPLY, CLAIM, RELEASE, RENEW

log = logging.getLogger(__name__)

#: A previous run with a job in one of these states makes a repeated instance event a
#: duplicate. Deferred jobs do not count: all of a job's dependencies belong to its run, so a
#: run whose jobs are only deferred is stuck behind a failed job and may run again.
ACTIVE = {JobStatus.QUEUED.value, JobStatus.STARTED.value, JobStatus.SCHEDULED.value}

#: How long an event stays claimed if the process planning it dies (released at once otherwise).
CLAIM_MS = 60_000

#: How many event outcomes `keys.RECENT_EVENTS` keeps (DICOMFLOW_RECENT_EVENTS; 0: none).
RECENT_EVENTS = 10_000
#: The headers kept with an event's outcome: what an operator searches by and recognises it by.
RECENT_HEADERS = ("PatientID", "PatientName", "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
#: Seconds per bucket of `keys.rate_bucket`, and how long a bucket is kept.
RATE_BUCKET, RATE_KEEP = 10, 3600
#: The longest callback traceback kept with an event's outcome (characters, its end).
RECENT_TRACEBACK = 4000

class EventsBusy(DicomflowError):
    """An event of the batch is being planned by another request right now: retry the batch."""


class PushMoved(DicomflowError):
    """A push received an instance between reading it and firing it: nothing fired, try later."""


@dataclass
class EventResult:
    """What became of one event; returned to the plugin and kept for operators."""

    key: str
    status: str  # scheduled | duplicate | known | unchanged | nothing | invalid
    jobs: dict[str, str] = field(default_factory=dict)
    declined: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"key": self.key, "status": self.status}
        for name in ("jobs", "declined", "notes", "errors"):
            if value := getattr(self, name):
                out[name] = value
        return out


def run_id(event_key: str, batch: str) -> str:
    """`<event hash>-<batch>`: the jobs of an event's run are `<jobName>-<run id>`, ids RQ
    accepts, readable in the dashboard; every run of an event has the same event hash, and
    the batch part (random per request) tells its runs apart."""
    return f"{hashlib.sha1(event_key.encode()).hexdigest()[:12]}-{batch[:8]}"


class Enqueuer:
    """Plans and enqueues batches of events with a few Redis round trips per batch."""

    def __init__(self, connection: Redis, settings: Settings):
        self.connection = connection
        self.settings = settings
        self.queues = {name: Queue(name, connection=connection) for name in settings.queues}
        # One per queue, built once: RQ's register_dependency builds one per job, and that
        # constructor checks its serializer against a runtime Protocol (slow) every time.
        self.deferred = {name: DeferredJobRegistry(queue=queue) for name, queue in self.queues.items()}
        self.hashes = JobHashes(connection, settings)
        self._release = connection.register_script(RELEASE)
        self._apply = connection.register_script(APPLY)
        self._claim = connection.register_script(CLAIM)
        self._renew = connection.register_script(RENEW)
        self.pushes = PushTracker(settings.stable_age)
        self.callbacks = CallbackRunner(connection, settings.callback_timeout, settings.callback_strikes)
        self.recent_length = _recent_length(settings)

    def submit(self, events: Sequence[Event], registry: Registry,
               planner: Callable[..., Plan] = plan_event, guards: Sequence[tuple[str, str, str]] = (),
               extra: Sequence[tuple] = ()) -> list[EventResult]:
        """Plan and enqueue `events` (one batch from the plugin); results in the same order.

        Args:
            guards: (hash key, field, value) that must still hold when the batch is written.
            extra: more commands written in the same atomic step (closing a push).

        Raises:
            EventsBusy: another request is planning one of these events, or took over its claim
                while this one planned; nothing was enqueued.
            PushMoved: a guard no longer held; nothing was enqueued.
            redis.RedisError: Redis failed; nothing was enqueued and the claims are released.
        """
        token = uuid.uuid4().hex
        claimed_keys = sorted({keys.claim(e.key) for e in events})
        done = False
        try:
            results = self._submit(events, registry, planner, token, guards, extra)
            done = True
            return results
        finally:
            if not done and claimed_keys:
                try:
                    self._release(keys=claimed_keys, args=[token])
                except redis.RedisError:
                    log.error("could not release the claims of a failed batch; they expire in %d s",
                              CLAIM_MS // 1000)

    def _submit(self, events: Sequence[Event], registry: Registry, planner: Callable[..., Plan],
                token: str, guards: Sequence[tuple[str, str, str]], extra: Sequence[tuple]) -> list[EventResult]:
        conn = self.connection
        # Round trip 1: claim each event key (concurrent duplicates lose), read its last run.
        claim_keys, claim_args = [], [token, CLAIM_MS]
        for event in events:
            run_key = keys.event_run(event.key)
            stateless = event.level is Level.INSTANCE or event.push is not None
            claim_keys += (keys.claim(event.key), run_key, run_key if stateless else self._state_key(event))
            claim_args.append(0 if stateless else 1)
        replies = iter(self._claim(keys=claim_keys, args=claim_args))
        claimed, previous, states = [], [], []
        for _ in events:
            claimed.append(bool(next(replies)))
            previous.append(_run_record(next(replies)))
            states.append({m.decode() for m in next(replies)})

        # Round trip 2: are the previous runs still going?
        prior_ids = sorted({jid for run in previous if run for jid in run.jobs.values()})
        status: dict[str, str] = {}
        if prior_ids:
            pipe = conn.pipeline(transaction=False)
            for jid in prior_ids:
                pipe.hget(Job.key_for(jid), "status")
            status = {jid: (s.decode() if s else "") for jid, s in zip(prior_ids, pipe.execute())}

        mine: set[str] = set()
        for event, got_claim in zip(events, claimed):
            if got_claim:
                mine.add(event.key)
            elif event.key not in mine:
                # Claimed by another request (or one that died): answer "retry later", never
                # "duplicate" — if that request fails, this copy must not have been dropped.
                raise EventsBusy(f"{event.key} is being planned by another request; retry the batch")
        renew = Renewal(self._renew, sorted(keys.claim(k) for k in mine), token)

        results: list[EventResult] = []
        plans: list[tuple[Plan, EventResult, set[str]]] = []
        first_seen: set[str] = set()
        pushing: list[Event] = []
        for event, run, state in zip(events, previous, states):
            result = EventResult(event.key, "scheduled")
            results.append(result)
            if event.key in first_seen:
                result.status = "duplicate"
                result.notes.append("the same event came earlier in this batch")
                continue
            first_seen.add(event.key)
            new_members: set[str] = set()
            if event.level is Level.INSTANCE:
                if run is not None and (event.replay or (event.receivedAt is not None
                                                         and run.received_at == event.receivedAt)):
                    # The same capture delivered again (the plugin re-sent a batch whose answer it
                    # did not get, or re-read it after Orthanc stopped abruptly): planned before.
                    result.status = "known"
                    result.jobs = run.jobs
                    result.notes.append("this copy was delivered before; its jobs were planned then")
                    continue
                pushing.append(event)
                active = {name: jid for name, jid in (run.jobs if run else {}).items() if status.get(jid) in ACTIVE}
                if active:
                    result.status = "duplicate"
                    result.jobs = active
                    result.notes.append("jobs of an earlier copy of this instance are still queued or running")
                    continue
            elif event.push is not None:
                new_members = set(event.orthanc.get("instances") or [])
            else:
                members = set(event.orthanc.get("instances") or [])
                new_members = members - state
                if state and not new_members:
                    result.status = "unchanged"
                    result.notes.append(f"already handed to jobs with the same {len(state)} members")
                    continue
            plan = planner(event, registry, self.settings.config, runner=self.callbacks)
            plans.append((plan, result, new_members))
            renew.maybe()

        # Round trip 3: every job of the batch in one atomic script.
        pipe = BatchWrite()
        now = rq_now()
        stamp = utcformat(now)  # one creation time for the batch, in RQ's format
        used_queues: set[str] = set()
        batcher = Batcher()
        for plan, result, new_members in plans:
            self._record(plan, result, pipe, now.timestamp())
            if plan.jobs:
                self._enqueue_plan(plan, result, pipe, new_members, used_queues, now.timestamp(), stamp, token,
                                   batcher)
            elif result.status == "scheduled":
                result.status = "nothing"
                if plan.event.level is Level.INSTANCE and not plan.failures:
                    # Seen, and nothing to run: a re-delivered copy must not be planned again.
                    pipe.add("SET", keys.event_run(plan.event.key), _run_value({}, plan.event),
                             "EX", self.settings.failure_ttl)
            if (plan.event.level is not Level.INSTANCE and plan.event.push is None and new_members
                    and plan.jobs and not plan.failures):
                # Only what was really handed to jobs: a series whose callback failed, or that
                # no active service wanted yet, runs when it is sent again.
                pipe.add("SADD", self._state_key(plan.event), *sorted(new_members))
                pipe.add("EXPIRE", self._state_key(plan.event), self.settings.failure_ttl)
        for chunk in batcher.chunks:
            self._write_chunk(chunk, pipe, now.timestamp(), stamp)
        self.pushes.track(pipe, pushing, registry.push_levels(), now.timestamp())
        for name in sorted(used_queues):  # what RQ's enqueue does per job, once per batch here
            pipe.add("SADD", Queue.redis_queues_keys, self.queues[name].key)
        counts = Counter(f"events:{r.status}" for r in results)
        counts["jobs"] = sum(len(r.jobs) for r in results if r.status == "scheduled")
        for name, n in counts.items():
            if n:
                pipe.add("HINCRBY", keys.STATS, name, n)
        self._observe(events, results, plans, pipe, now.timestamp(), counts["jobs"])
        for command in extra:
            pipe.add(*command)
        args = [token, pipe.packed()]
        if guards:
            args.append(msgpack.packb([list(g) for g in guards], use_bin_type=False))
        written = self._apply(keys=sorted(keys.claim(k) for k in mine), args=args)
        if written == -1:
            raise EventsBusy("a claim of this batch expired while it was planned and another request took "
                             "it over; nothing of this batch was enqueued")
        if written == 0:
            raise PushMoved("the push received an instance since it was read; nothing was enqueued")
        return results

    def _observe(self, events: Sequence[Event], results: list[EventResult],
                 plans: list[tuple[Plan, EventResult, set[str]]], pipe: BatchWrite, now: float, jobs: int) -> None:
        """Add what the status page and the metrics read to the batch's write: each event's
        outcome (one LPUSH and one LTRIM per batch), the 10-second rate bucket, jobs per service."""
        bucket = keys.rate_bucket(int(now) // RATE_BUCKET)
        pipe.add("HINCRBY", bucket, "events", len(events))
        if jobs:
            pipe.add("HINCRBY", bucket, "jobs", jobs)
        pipe.add("EXPIRE", bucket, RATE_KEEP)
        per_job: Counter[str] = Counter()
        for plan, result, _ in plans:
            if result.status == "scheduled":
                for planned in plan.jobs:   # a fanOut job is one job per item
                    count = 1 if planned.items is None else len(planned.items)
                    per_job[f"{planned.job.service}/{planned.name}"] += count
        for name, n in per_job.items():
            pipe.add("HINCRBY", keys.JOBS_ENQUEUED, name, n)
        if not self.recent_length or not events:
            return
        failures = {id(result): plan.failures for plan, result, _ in plans if plan.failures}
        records = []
        for event, result in zip(events, results):
            headers = event.headers
            record: dict[str, Any] = {"t": now, "key": result.key, "level": event.level.value,
                                      "status": result.status, "remoteAet": event.remoteAet}
            for keyword in RECENT_HEADERS:
                if keyword in headers:
                    record[keyword] = headers[keyword]
            if study := event.orthanc.get("study"):
                record["orthancStudy"] = study
            if result.jobs:
                record["jobs"] = result.jobs
            if result.declined:
                record["declined"] = result.declined
            if result.notes:
                record["notes"] = result.notes
            if id(result) in failures:
                record["errors"] = [{"jobName": f.jobName, "error": f.error,
                                     "traceback": f.traceback[-RECENT_TRACEBACK:]} for f in failures[id(result)]]
            records.append(json.dumps(record, separators=(",", ":"), default=str))
        pipe.add("LPUSH", keys.RECENT_EVENTS, *records)  # the batch's last event ends up first
        pipe.add("LTRIM", keys.RECENT_EVENTS, 0, self.recent_length - 1)

    def _state_key(self, event: Event) -> str:
        """Where the instance ids already handed to this series'/study's jobs are kept."""
        return keys.series_state(event.uid) if event.level is Level.SERIES else keys.study_state(event.uid)

    def _record(self, plan: Plan, result: EventResult, pipe: BatchWrite, now: float) -> None:
        """Keep callback failures where an operator sees them (API + Redis list)."""
        for failure in plan.failures:
            result.errors.append(f"{failure.jobName}: {failure.error}")
            pipe.add("LPUSH", keys.CALLBACK_ERRORS, json.dumps({
                "time": now, "event": plan.event.key, "jobName": failure.jobName,
                "error": failure.error, "traceback": failure.traceback,
            }))
        if plan.failures:
            pipe.add("LTRIM", keys.CALLBACK_ERRORS, 0, self.settings.error_log_length - 1)
        result.declined = plan.declined
        result.notes.extend(f"{name}: switched off (its callback kept timing out); not asked"
                            for name in plan.switched_off)

    def _enqueue_plan(self, plan: Plan, result: EventResult, pipe: BatchWrite, new_members: set[str],
                      used_queues: set[str], now: float, stamp: str, batch: str, batcher: Batcher) -> None:
        """Add the plan's jobs to the batch's atomic write, each written once (HSET) and pushed or
        deferred; jobs of a batching service go to `batcher` (written with their chunk).

        `now` is the batch's time (the deferred registry's score), `stamp` the same in RQ's format.
        """
        event = plan.event
        context = event.context()
        if new_members:
            context["newMembers"] = sorted(new_members)
        ids: dict[str, str] = {}
        written: dict[str, list[str]] = {}   # jobName -> its job ids (several when it fans out)
        run = run_id(event.key, batch)
        description_tail = f"{event.level.value} {event.uid}"
        for planned in plan.jobs:
            spec = planned.job.spec
            used_queues.add(spec.priority)
            job_id = f"{spec.jobName}-{run}"
            waits_for = [job for d in planned.waits_for for job in written[d]]
            if spec.batchSize > 1 and event.level is Level.INSTANCE:
                job_id = batcher.add(planned, event, context, plan.added_params, waits_for, job_id)
                ids[spec.jobName], written[spec.jobName] = job_id, [job_id]
            elif planned.items is not None:   # fanOut: one job per item, each sees only its own
                written[spec.jobName] = []
                for index, item in enumerate(planned.items):
                    own = {**plan.added_params, spec.jobName: {**plan.added_params[spec.jobName],
                                                               spec.fanOut: [item]}}
                    item_id = f"{job_id}-{index}"
                    self._write_job(pipe, planned, item_id, now, stamp, waits_for,
                                    description=f"{spec.jobName} {description_tail} [{item}]",
                                    kwargs={"jobName": spec.jobName, "worker": spec.worker, "headers": event.headers,
                                            "params": spec.params, "added_params": own, "event": context},
                                    meta={"event": event.key, "service": planned.job.service, "notes": planned.notes,
                                          "item": item})
                    ids[f"{spec.jobName}[{item}]"] = item_id
                    written[spec.jobName].append(item_id)
            else:
                self._write_job(pipe, planned, job_id, now, stamp, waits_for,
                                description=f"{spec.jobName} {description_tail}",
                                kwargs={"jobName": spec.jobName, "worker": spec.worker, "headers": event.headers,
                                        "params": spec.params, "added_params": plan.added_params, "event": context},
                                meta={"event": event.key, "service": planned.job.service, "notes": planned.notes})
                ids[spec.jobName], written[spec.jobName] = job_id, [job_id]
            result.notes.extend(f"{spec.jobName}: {note}" for note in planned.notes)
        result.jobs = ids
        pipe.add("SET", keys.event_run(event.key), _run_value(ids, event), "EX", self.settings.failure_ttl)
        study = str(event.headers.get("StudyInstanceUID") or "").strip()
        if study:  # for "has every service finished with this study?" (retention, GET /api/v1/studies)
            pipe.add("SADD", keys.study_jobs(study), *ids.values())
            pipe.add("EXPIRE", keys.study_jobs(study), self.settings.failure_ttl)

    def _write_chunk(self, chunk: Chunk, pipe: BatchWrite, now: float, stamp: str) -> None:
        """One job for a chunk of instances (scheduler/batching.py): the first instance's
        keywords, as any instance job gets, plus `batch` with every instance's."""
        first, spec = chunk.items[0], chunk.planned.job.spec
        series = chunk.first.headers.get("SeriesInstanceUID") if chunk.first else ""
        self._write_job(pipe, chunk.planned, chunk.job_id, now, stamp, chunk.waits_for,
                        description=f"{spec.jobName} {len(chunk.items)} instance(s) of series {series}",
                        kwargs={"jobName": spec.jobName, "worker": spec.worker, "headers": first["headers"],
                                "params": spec.params, "added_params": first["added_params"],
                                "event": first["event"], "batch": chunk.items},
                        meta={"event": chunk.events[0], "events": chunk.events, "service": chunk.planned.job.service,
                              "notes": chunk.notes})

    def _write_job(self, pipe: BatchWrite, planned: PlannedJob, job_id: str, now: float, stamp: str,
                   waits_for: list[str], description: str, kwargs: dict[str, Any], meta: dict[str, Any]) -> None:
        """One job's hash, and its id pushed on its queue or registered as deferred."""
        queue = self.queues[planned.job.spec.priority]
        pipe.hset(Job.key_for(job_id), self.hashes.mapping(planned.job, kwargs=kwargs, description=description,
                                                           meta=meta, depends_on=waits_for, stamp=stamp))
        if not waits_for:
            pipe.add("RPUSH", queue.key, job_id)  # what Queue.push_job_id writes
        else:
            # Its dependencies are created in this same atomic write, so none can have
            # finished yet: register it as deferred without RQ's WATCH round trips (what
            # Job.register_dependency writes: the deferred registry, scored by creation
            # time, and both link sets).
            pipe.add("ZADD", self.deferred[queue.name].key, now, job_id)
            pipe.add("SADD", dependencies_key(job_id), *waits_for)
            for dependency_id in waits_for:
                pipe.add("SADD", Job.dependents_key_for(dependency_id), job_id)


class BatchWrite:
    """The commands of a batch's atomic write, collected as word lists for `scripts.APPLY`.

    Plain tuples, not a redis-py pipeline: `APPLY` runs them from one MessagePack argument,
    so redis-py never sends them, and its command API (a pipeline's `hset`, `set`, ...) cost
    ~15 % of the scheduler's CPU per event only to build the same word lists
    (`bench/scheduler.py`, events as the plugin sends them). Words are str, bytes or numbers.
    """

    def __init__(self) -> None:
        self.commands: list[tuple] = []

    def add(self, *words: Any) -> None:
        self.commands.append(words)

    def hset(self, key: str, mapping: dict[str, Any]) -> None:
        self.commands.append(("HSET", key, *chain.from_iterable(mapping.items())))

    def packed(self) -> bytes:
        """The commands as `APPLY` takes them (bytes as MessagePack's raw strings: Redis's
        cmsgpack predates the bin types)."""
        return msgpack.packb(self.commands, use_bin_type=False)


def _recent_length(settings: Settings) -> int:
    """How many event outcomes to keep, from DICOMFLOW_RECENT_EVENTS (a whole number >= 0)."""
    raw = str(settings.config.get("DICOMFLOW_RECENT_EVENTS", "") or RECENT_EVENTS).strip()
    if not raw.isdigit():
        raise ConfigError(f"DICOMFLOW_RECENT_EVENTS must be a whole number >= 0, not {raw!r}")
    return int(raw)


def dependencies_key(job_id: str) -> str:
    """Where RQ keeps the ids a job depends on (`Job.dependencies_key`, without building a Job)."""
    return f"{Job.redis_job_namespace_prefix}:{job_id}:dependencies"


@dataclass(frozen=True)
class RunRecord:
    """An event's last run: jobName -> job id ({}: planned, nothing to run), and the time
    Orthanc received the copy that was planned (None: unknown)."""

    jobs: dict[str, str]
    received_at: float | None


def _run_value(ids: dict[str, str], event: Event) -> str:
    return json.dumps({"jobs": ids, "receivedAt": event.receivedAt})


def _run_record(raw: bytes | None) -> RunRecord | None:
    """The run `_submit` stored for an event, None if it was never planned (or expired)."""
    if raw is None:
        return None
    value = json.loads(raw)
    if "jobs" not in value:  # written before the record kept the reception time
        return RunRecord(value, None)
    return RunRecord(value["jobs"], value.get("receivedAt"))


class Renewal:
    """Keeps a batch's claims while its callbacks run (a third of the claim's life at a time)."""

    def __init__(self, script: Any, claim_keys: list[str], token: str):
        self.script, self.claim_keys, self.token = script, claim_keys, token
        self.last = time.monotonic()

    def maybe(self) -> None:
        now = time.monotonic()
        if now - self.last >= CLAIM_MS / 3000:
            self.script(keys=self.claim_keys, args=[self.token, CLAIM_MS])
            self.last = now

"""The bookkeeping subcommands of `dicomflow-export`: list, status, retry, force, parquet."""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator


from dicomflow.extracts.cli import Context, _project, _project_study, command, emit
from dicomflow.extracts.status import ExportStatus


@contextlib.contextmanager
def _records(context: Context) -> Iterator:
    # the database layer (SQLAlchemy, alembic) and the de-identifier load only when a command runs:
    # --help stays fast
    from dicomflow.extracts.records import open_records

    records = open_records(context.settings.records_url)
    try:
        yield records
    finally:
        records.dispose()


def _list_arguments(parser: argparse.ArgumentParser) -> None:
    _project(parser)
    parser.add_argument("--status", action="append", choices=[s.value for s in ExportStatus],
                        help="only studies in this state (repeatable)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("list", "List a project's studies: pseudonymised StudyInstanceUID, status, instances, when, where.",
         _list_arguments)
def list_studies(args: argparse.Namespace, context: Context) -> int:
    from dicomflow.extracts import operator

    operator.check_slug(args.project)
    statuses = [ExportStatus(s) for s in args.status] if args.status else None
    with _records(context) as records:
        rows = records.studies(args.project, statuses)
    if args.json:
        emit(rows)
        return 0
    if not rows:
        print(f"project {args.project}: no study recorded" + (f" as {', '.join(args.status)}" if args.status else ""))
        return 0
    print(f"{'STUDY':<46} {'STATUS':<10} {'INSTANCES':>9}  {'EXPORTED AT':<25}  DESTINATIONS / REASON")
    for row in rows:
        tail = ",".join(row["destinations"]) + (f"  {row['reason']}" if row["reason"] else "")
        if row["failedFiles"]:
            tail += f"  ({len(row['failedFiles'])} files failed)"
        print(f"{row['studyId']:<46} {row['status']:<10} {row['instances']:>9}  {row['exportedAt'] or '-':<25}  {tail}")
    return 0


@command("status", "A project's counts by status and its last Parquet extract; with STUDY, that study and "
                   "every attempt at it.", _project_study)
def status(args: argparse.Namespace, context: Context) -> int:
    from dicomflow.extracts import operator

    operator.check_slug(args.project)
    with _records(context) as records:
        if args.study is None:
            emit(records.summary(args.project))
            return 0
        row = operator.find_study(records, context.settings, args.project, args.study)
        emit({**row, "history": records.history(row["id"])})
    return 0


def _rerun(args: argparse.Namespace, context: Context, force: bool) -> int:
    from dicomflow.extracts import operator

    with _records(context) as records:
        try:
            queued = operator.rerun(records, context.settings, context.redis(), args.project, args.study,
                                    force=force)
        except operator.RedisError as exc:
            print(f"dicomflow-export: cannot queue the jobs ({exc}); the studies stay 'requested' and the next "
                  "retry queues them", file=sys.stderr)
            return 1
    emit({"project": args.project, "queued": queued})
    return 0


@command("retry", "Re-run the failed or partial exports of a project (or of one STUDY): their jobs are queued "
                  "again.", _project_study)
def retry(args: argparse.Namespace, context: Context) -> int:
    return _rerun(args, context, force=False)


@command("force", "Export again studies already exported (one STUDY, or every study of the project), and "
                  "re-run failed ones.", _project_study)
def force(args: argparse.Namespace, context: Context) -> int:
    return _rerun(args, context, force=True)


@command("parquet", "Write a Parquet extract of every study exported for the project (PIXL's layout under "
                    "DICOMFLOW_EXPORTS_DIR/<project>/all_extracts/, `latest` switched to it) and upload it to the "
                    "project's Parquet destinations; exit 1 if an upload failed (the local extract stays).",
         _project)
def parquet(args: argparse.Namespace, context: Context) -> int:
    from dicomflow.extracts import operator
    from dicomflow.extracts.parquet import LOCAL, write_extract
    from dicomflow.extracts.project import load_project

    operator.check_slug(args.project)
    project = load_project(context.settings.projects_dir / f"{args.project}.yaml")
    uploads = [n for n in project.model.destinations.parquet if n != LOCAL]
    with _records(context) as records:
        result = write_extract(project, records, context.settings, config=context.config,
                               connection=context.redis() if uploads else None)
    emit(result.as_json())
    failed = [name for name, r in result.destinations.items() if r.get("error") or r.get("failed")]
    if failed:
        print(f"dicomflow-export: the upload to {', '.join(failed)} failed (see destinations above)", file=sys.stderr)
        return 1
    return 0

"""Research extracts' bookkeeping over the API: what `dicomflow-export` does (docs/extracts.md)."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from dicomflow.config import settings_from_config
from dicomflow.extracts import operator
from dicomflow.extracts.errors import ProjectError, RecordsError
from dicomflow.extracts.project import ExtractSettings
from dicomflow.extracts.records import ExportStatus, Records, open_records

bp = Blueprint("exports", __name__, url_prefix="/api/v1/exports")


class _Exports:
    """The extracts' settings and the records, opened at the first request (not at start: the
    scheduler runs without a database until someone asks)."""

    def __init__(self, config):
        self.settings = settings_from_config(ExtractSettings, config, "extracts")
        self._records: Records | None = None

    @property
    def records(self) -> Records:
        if self._records is None:
            self._records = open_records(self.settings.records_url)
        return self._records


def _exports() -> _Exports:
    state = current_app.extensions["dicomflow"]
    found = current_app.extensions.get("dicomflow.exports")
    if found is None:
        found = current_app.extensions["dicomflow.exports"] = _Exports(state.settings.config)
    return found


@bp.errorhandler(operator.NotFound)
def _not_found(exc: operator.NotFound):
    return jsonify(error="not-found", message=str(exc)), 404


@bp.errorhandler(ProjectError)
def _bad_project(exc: ProjectError):
    return jsonify(error="bad-project", message=str(exc)), 422


@bp.errorhandler(RecordsError)
def _records_down(exc: RecordsError):
    return jsonify(error="records-unavailable", message=str(exc)), 503


@bp.get("/<project>")
def project_studies(project: str):
    """A project's counts by status, last Parquet extract, and studies (`?status=failed`, repeatable)."""
    operator.check_slug(project)
    wanted = request.args.getlist("status")
    unknown = [s for s in wanted if s not in {e.value for e in ExportStatus}]
    if unknown:
        return jsonify(error="bad-request", message=f"unknown status {unknown[0]!r} (one of "
                                                    f"{', '.join(e.value for e in ExportStatus)})"), 400
    records = _exports().records
    return jsonify({**records.summary(project),
                    "studyList": records.studies(project, [ExportStatus(s) for s in wanted] or None)})


@bp.get("/<project>/studies/<study>")
def study_status(project: str, study: str):
    """One study (pseudonymised or original StudyInstanceUID) and every attempt at it."""
    exports = _exports()
    row = operator.find_study(exports.records, exports.settings, project, study)
    return jsonify({**row, "history": exports.records.history(row["id"])})


def _rerun(project: str, force: bool):
    body = request.get_json(silent=True) or {}
    study = body.get("study") if isinstance(body, dict) else None
    if study is not None and not isinstance(study, str):
        return jsonify(error="bad-request", message='expected {"study": "<StudyInstanceUID>"} or no body'), 400
    exports = _exports()
    queued = operator.rerun(exports.records, exports.settings, current_app.extensions["dicomflow"].connection,
                            project, study, force=force)
    return jsonify(project=project, queued=queued), 202


@bp.post("/<project>/retry")
def retry(project: str):
    """Queue again the failed or partial exports (`{"study": UID}`: that one only)."""
    return _rerun(project, force=False)


@bp.post("/<project>/force")
def force(project: str):
    """Export again studies already exported (`{"study": UID}`: that one; no body: every study)."""
    return _rerun(project, force=True)


@bp.post("/<project>/parquet")
def parquet(project: str):
    """Write a Parquet extract of the project's exported studies (and upload it where the project says)."""
    from dicomflow.extracts.parquet import write_extract
    from dicomflow.extracts.project import load_project

    operator.check_slug(project)
    exports = _exports()
    path = exports.settings.projects_dir / f"{project}.yaml"
    if not path.is_file():
        raise operator.NotFound(f"no project file {path}")
    result = write_extract(load_project(path), exports.records, exports.settings,
                           config=current_app.extensions["dicomflow"].settings.config,
                           connection=current_app.extensions["dicomflow"].connection)
    return jsonify(result.as_json()), 201

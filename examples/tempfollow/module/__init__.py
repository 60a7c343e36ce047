"""Worker of the follow-up example: starts only after tempJob finished for the same instance."""


def worker(jobName, headers, params, added_params, **kwargs):
    """Return both callbacks' additions, to show they reach every worker."""
    return {"jobName": jobName, "SOPInstanceUID": headers.get("SOPInstanceUID"),
            "tempJob": added_params.get("tempJob"), "mine": added_params.get(jobName)}

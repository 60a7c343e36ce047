"""Callback of the follow-up example: sees what tempJob's callback added for this instance."""


def callback(jobName, headers, params, added_params, **kwargs):
    """Accept when tempJob accepted the same instance; record what it saw."""
    seen = added_params.get("tempJob", {}).get("custom-data")
    if not seen:
        return False
    return True, {"from-tempJob": seen["SOPInstanceUID"]}

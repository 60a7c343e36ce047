"""Worker of the template service: runs on an RQ worker with the instance's file at `dcmpath`."""

import os


def worker(jobName, headers, params, added_params, dcmpath=None, **kwargs):
    """Report what the job was given (the return value is kept as the RQ job result)."""
    return {
        "jobName": jobName,
        "SOPInstanceUID": headers.get("SOPInstanceUID"),
        "custom-data": added_params.get(jobName, {}).get("custom-data"),
        "dcmpath": dcmpath,
        "size": os.path.getsize(dcmpath) if dcmpath else None,
    }

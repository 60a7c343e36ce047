"""Callback of the template service: runs in the scheduler for every stored instance."""


def callback(jobName, headers, params, added_params, **kwargs):
    """Accept every instance; hand the patient and instance ids on under added_params["tempJob"]."""
    return True, {"custom-data": {"PatientID": headers.get("PatientID"),
                                  "SOPInstanceUID": headers.get("SOPInstanceUID"),
                                  "greeting": params.get("greeting")}}

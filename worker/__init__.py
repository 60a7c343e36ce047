"""The RQ worker runtime: queues, the services' import path, the job context and DICOM files."""

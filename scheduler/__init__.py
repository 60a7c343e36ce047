"""The scheduler: event intake, service registry, planning and enqueueing (a Flask app)."""

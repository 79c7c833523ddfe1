"""Ferry's shared core: settings, the Faust app, the job model, topics and the jobs table.

Both sides import from here: the API (``api/``) publishes to the topics and reads the table's
changelog; the workers (``workers/``) consume the topics and write the table.
"""

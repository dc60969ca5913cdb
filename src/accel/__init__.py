"""Optional accelerations that plug in behind the core's seams (``src.modules.scoring.Backbone`` and the decode loop's
``Decoder``); chosen by the ``accel`` config group. The core imports nothing from here."""

"""Process start-up and the ('data',) device mesh: every module that knows about processes or devices."""

"""Process start-up and the ('data',) device mesh: what knows about processes and devices."""

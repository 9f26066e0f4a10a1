"""Dev harnesses: a private Mosquitto on a free loopback port, and the demo built on it."""

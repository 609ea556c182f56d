"""The integration engineer's console door at /console: a browser page served by the gateway, and the JSON it reads.

Parses, calls the core (gateway/core/operations.py), renders. What belongs to the HL7 door (applying a stored
message again, the mapping bench, the mapping file) comes in as callables the wiring hands over (tools.py), since a
door never imports another."""

"""What crosses a process boundary: the versioned codec, the HTTP client, the weights stream.

The server, the trainer and the generation workers import it; it imports only the shared leaves
(simple_grpo.errors), so both sides of the wire read one definition.
"""

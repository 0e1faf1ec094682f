"""The message bus: one protocol, a RabbitMQ and an in-process implementation."""

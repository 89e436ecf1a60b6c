"""The single error the wire layer raises."""


class MalformedPacket(ValueError):
    """A buffer does not hold a well-formed header of the kind asked for."""

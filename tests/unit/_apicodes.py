"""How Headscale (through grpc-gateway) pairs an error body's gRPC `code` with the HTTP
status: runtime.HTTPStatusFromCode, written out from grpc-gateway's documentation. An error
body is right when the status of its code is the response's status."""

HTTP_STATUS_OF_CODE = {
    1: 499,  # Canceled
    2: 500,  # Unknown
    3: 400,  # InvalidArgument
    4: 504,  # DeadlineExceeded
    5: 404,  # NotFound
    6: 409,  # AlreadyExists
    7: 403,  # PermissionDenied
    8: 429,  # ResourceExhausted
    9: 400,  # FailedPrecondition
    10: 409,  # Aborted
    11: 400,  # OutOfRange
    12: 501,  # Unimplemented
    13: 500,  # Internal
    14: 503,  # Unavailable
    15: 500,  # DataLoss
    16: 401,  # Unauthenticated
}


def assert_error_body(body: object, status: int) -> None:
    """{code, message, details} with the code that grpc-gateway turns into `status`."""
    assert isinstance(body, dict) and set(body) == {"code", "message", "details"}, body
    assert HTTP_STATUS_OF_CODE.get(body["code"]) == status, (status, body)
    assert isinstance(body["message"], str) and body["message"], body
    assert body["details"] == [], body

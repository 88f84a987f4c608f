"""Errors as OpenAI's API writes them, so its clients raise the right exception with our message.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "messages", "code": null}}

The `openai` client turns the status into its exception class (400 BadRequestError, 401
AuthenticationError, 404 NotFoundError, 413/422 APIStatusError, 503 InternalServerError after its
retries) and shows `message`; a stream that fails after it began carries the same object as one
`data:` event, which the client raises as APIError.
"""
from __future__ import annotations

TYPES = {401: "authentication_error", 404: "invalid_request_error", 413: "invalid_request_error",
         500: "server_error", 503: "server_overloaded", 504: "timeout"}


class ApiError(Exception):
    """One bad request, or the server's refusal of it: an HTTP status and a message naming the field,
    the value, and what was expected."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": TYPES.get(status, "invalid_request_error"), "param": param,
                      "code": code}}

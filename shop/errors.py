"""The shop's exceptions, each with the HTTP status it maps to.

ShopError (500)
├── BadRequest (400)
├── Unauthorized (401)
├── TooLarge (413)               a body beyond the size limit
├── UnsupportedMediaType (415)   a body that is not application/json
├── OrderNotFound (404)
├── ProductNotFound (404)
├── OutOfStock (409)
├── IdempotencyKeyReused (422)   same key, different request body
├── Busy (503)                   a lock or statement timeout: try again
└── Unavailable (503)            a database could not be reached in time
"""

from __future__ import annotations


class ShopError(Exception):
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ShopError):
    status = 400


class Unauthorized(ShopError):
    status = 401


class TooLarge(ShopError):
    status = 413


class UnsupportedMediaType(ShopError):
    status = 415


class OrderNotFound(ShopError):
    status = 404


class ProductNotFound(ShopError):
    status = 404


class OutOfStock(ShopError):
    status = 409


class IdempotencyKeyReused(ShopError):
    status = 422


class Busy(ShopError):
    status = 503


class Unavailable(ShopError):
    status = 503

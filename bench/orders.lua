-- wrk script: POST /orders, each request with its own Idempotency-Key and a random product.
-- KEY_TAG (env) must differ between concurrent wrk processes: equal keys would be replays.
-- PRODUCTS (env, default 1000): products are drawn from 1..PRODUCTS.
local products = tonumber(os.getenv("PRODUCTS") or "1000")
local key_tag = os.getenv("KEY_TAG") or tostring(os.time())
local threads_started = 0
local counter = 0
local prefix = ""

function setup(thread)
  threads_started = threads_started + 1
  thread:set("thread_id", threads_started)
end

function init(args)
  prefix = "wrk-" .. key_tag .. "-" .. tostring(thread_id) .. "-"
  math.randomseed(os.time() + thread_id)
end

function request()
  counter = counter + 1
  local body = string.format(
    '{"product_id": %d, "quantity": 1, "customer": "wrk", "address": "1 Loopback Road"}',
    math.random(1, products))
  local headers = {
    ["Content-Type"] = "application/json",
    ["Idempotency-Key"] = prefix .. counter,
  }
  return wrk.format("POST", "/orders", headers, body)
end

-- The end of one admitted request: the tokens it reserved and did not use
-- go back to the second they were taken from (if still in the window), and
-- its running slot is freed.
-- KEYS[1]: tokens window, KEYS[2]: running requests
-- ARGV: second of admission, tokens to give back, request id
local refund = tonumber(ARGV[2])
if refund > 0 then
  local n = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
  if n > 0 then
    redis.call('HSET', KEYS[1], ARGV[1], math.max(0, n - refund))
  end
end
redis.call('ZREM', KEYS[2], ARGV[3])
return 1

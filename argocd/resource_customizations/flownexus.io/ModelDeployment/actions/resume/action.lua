-- spec.rollout.paused = false: the rollout goes on; a held canary starts its step over.
if obj.spec.rollout == nil then
  obj.spec.rollout = {}
end
obj.spec.rollout.paused = false
return obj

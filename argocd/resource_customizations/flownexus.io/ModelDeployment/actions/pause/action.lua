-- spec.rollout.paused = true: a canary holds its step and weight; a new version waits.
if obj.spec.rollout == nil then
  obj.spec.rollout = {}
end
obj.spec.rollout.paused = true
return obj

-- suspend / resume a TrainingJob through spec.runPolicy.suspend (the pods stop, checkpoints stay).
local actions = {}
actions["suspend"] = {["disabled"] = true}
actions["resume"] = {["disabled"] = true}
local suspended = obj.spec ~= nil and obj.spec.runPolicy ~= nil and obj.spec.runPolicy.suspend == true
local phase = nil
if obj.status ~= nil then
  phase = obj.status.phase
end
if suspended then
  actions["resume"]["disabled"] = false
elseif phase ~= "Succeeded" and phase ~= "Failed" then
  actions["suspend"]["disabled"] = false
end
return actions
